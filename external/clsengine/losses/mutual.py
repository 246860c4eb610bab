"""Deep mutual learning (Zhang et al. 2018): each model is also pulled towards the others' predictions."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _binary_kl(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(q || p) of independent Bernoullis with p = sigmoid(own), q = sigmoid(other), summed over
    classes and averaged over the batch; log-sigmoids keep it finite for any logit."""
    q = torch.sigmoid(other)
    kl = (q * (F.logsigmoid(other) - F.logsigmoid(own))
          + (1.0 - q) * (F.logsigmoid(-other) - F.logsigmoid(-own)))
    return kl.sum(dim=1).mean()


def kl_to_target(own: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                 multilabel: bool = False) -> torch.Tensor:
    """T^2 * KL(p_target || p_own) at temperature T, averaged over the batch, the target detached (its gradient
    stays with its own model): softmax over the classes, or with `multilabel` independent Bernoullis (sigmoid)
    summed over the classes. The T^2 keeps the gradients' size at any T. Mutual learning's pairwise term and a
    fixed teacher's (losses/distillation.py)."""
    own, target = own.float() / temperature, target.detach().float() / temperature
    if multilabel:
        return _binary_kl(own, target) * temperature ** 2
    return F.kl_div(F.log_softmax(own, dim=1), F.log_softmax(target, dim=1), log_target=True,
                    reduction="batchmean") * temperature ** 2


def mutual_losses(logits: list[torch.Tensor], temperature: float = 1.0,
                  multilabel: bool = False) -> list[torch.Tensor]:
    """For each model i: mean over the other models j of KL(p_j || p_i), with p_j detached (kl_to_target).

    Detaching the targets keeps each term's gradient on its own model, as when every model is
    trained by its own optimizer. Scaled by temperature^2 so gradients keep their size at any T.
    With `multilabel`, every logit is an independent Bernoulli (sigmoid) instead of one softmax
    over the classes.
    """
    if len(logits) < 2:
        return [logits[0].new_zeros(())] if logits else []
    return [torch.stack([kl_to_target(own, other, temperature, multilabel)
                         for j, other in enumerate(logits) if j != i]).mean() for i, own in enumerate(logits)]
