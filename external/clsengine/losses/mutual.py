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


def mutual_losses(logits: list[torch.Tensor], temperature: float = 1.0,
                  multilabel: bool = False) -> list[torch.Tensor]:
    """For each model i: mean over the other models j of KL(p_j || p_i), with p_j detached.

    Detaching the targets keeps each term's gradient on its own model, as when every model is
    trained by its own optimizer. Scaled by temperature^2 so gradients keep their size at any T.
    With `multilabel`, every logit is an independent Bernoulli (sigmoid) instead of one softmax
    over the classes.
    """
    if len(logits) < 2:
        return [logits[0].new_zeros(())] if logits else []
    if multilabel:
        scaled = [x.float() / temperature for x in logits]
        return [torch.stack([_binary_kl(own, other.detach()) for j, other in enumerate(scaled) if j != i]).mean()
                * temperature ** 2 for i, own in enumerate(scaled)]
    log_probs = [F.log_softmax(x.float() / temperature, dim=1) for x in logits]
    out = []
    for i, own in enumerate(log_probs):
        terms = [F.kl_div(own, other.detach(), log_target=True, reduction="batchmean")
                 for j, other in enumerate(log_probs) if j != i]
        out.append(torch.stack(terms).mean() * temperature ** 2)
    return out
