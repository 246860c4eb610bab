"""Deep mutual learning (Zhang et al. 2018): each model is also pulled towards the others' predictions."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mutual_losses(logits: list[torch.Tensor], temperature: float = 1.0) -> list[torch.Tensor]:
    """For each model i: mean over the other models j of KL(p_j || p_i), with p_j detached.

    Detaching the targets keeps each term's gradient on its own model, as when every model is
    trained by its own optimizer. Scaled by temperature^2 so gradients keep their size at any T.
    """
    if len(logits) < 2:
        return [logits[0].new_zeros(())] if logits else []
    log_probs = [F.log_softmax(x.float() / temperature, dim=1) for x in logits]
    out = []
    for i, own in enumerate(log_probs):
        terms = [F.kl_div(own, other.detach(), log_target=True, reduction="batchmean")
                 for j, other in enumerate(log_probs) if j != i]
        out.append(torch.stack(terms).mean() * temperature ** 2)
    return out
