"""SAM: sharpness-aware minimisation (Foret et al., 2021) wrapped around any base optimizer.

SAM looks for weights whose whole neighbourhood has low loss, not just a sharp minimum: each update first
climbs to the (first-order) worst point within a ball of radius `rho`, ``w + e_w`` with
``e_w = rho * g / ||g||``, takes the gradient *there*, and applies it to the original weights ``w``.
With ``adaptive=True`` (ASAM, Kwon et al., 2021) the ball is scaled element-wise by ``|w|``
(``e_w = rho * w^2 * g / ||w * g||``), which makes the radius invariant to re-scaling of the weights.

Every update costs two forward/backward passes. The training loop uses it like this:

    loss_fn(model(x), y).backward()          # gradient at w
    clip_grad_norm_(model.parameters(), c)   # optional: clip after each backward, before each step
    optimizer.first_step(zero_grad=True)     # w -> w + e_w
    loss_fn(model(x), y).backward()          # gradient at w + e_w (same batch)
    clip_grad_norm_(model.parameters(), c)   # optional
    optimizer.second_step(zero_grad=True)    # back to w, then the base optimizer's step
    scheduler.step_iter()

or, equivalently, ``optimizer.step(closure)`` with a closure that runs forward + backward and returns the
loss (gradients are zeroed before each evaluation, so the closure need not zero them).
BatchNorm running statistics are updated by both passes; the second pass sees perturbed weights.

The base optimizer is built on the very same ``param_groups`` dicts as this wrapper, so a scheduler that
writes ``param_groups[i]["lr"]`` on the SAM object drives the base optimizer too. ``state_dict()`` is the
base optimizer's (momentum buffers, step counts, param groups), so resuming a run continues exactly.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

_EPS = 1e-12


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around ``base_optimizer_cls(param_groups, **base_kwargs)``."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05, adaptive: bool = False,
                 **base_kwargs: Any):
        if rho < 0.0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        # Same dicts, same list: a write to self.param_groups[i]["lr"] is a write to the base optimizer's.
        self._base = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self._base.param_groups
        self.defaults.update(self._base.defaults)
        self._perturbed = False

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self._base

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "_base" not in self.__dict__:  # during __init__: plain Optimizer behaviour
            super().add_param_group(param_group)
            return
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        self._base.add_param_group(param_group)  # appends to the shared list

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor | None:
        """L2 norm over all gradients (times |w| for ASAM groups), on the first parameter's device."""
        device = self.param_groups[0]["params"][0].device
        pairs = [(p, group["adaptive"]) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not pairs:
            return None
        # at least float32, so that half-precision gradients do not overflow in the sum of squares
        dtype = torch.float64 if any(p.grad.dtype == torch.float64 for p, _ in pairs) else torch.float32
        norms = [torch.linalg.vector_norm(p.grad * p.abs() if adaptive else p.grad, dtype=dtype).to(device)
                 for p, adaptive in pairs]
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w and move to the worst nearby point w + e_w, using the gradients computed at w."""
        if self._perturbed:
            raise RuntimeError("SAM.first_step called twice without second_step in between")
        grad_norm = self._grad_norm()
        if grad_norm is not None:
            for group in self.param_groups:
                scale = group["rho"] / (grad_norm + _EPS)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    self.state[p]["old_p"] = p.detach().clone()
                    e_w = p.grad * p.square() if group["adaptive"] else p.grad
                    p.add_(e_w * scale.to(device=p.device, dtype=p.dtype))
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly and let the base optimizer apply the gradients taken at w + e_w."""
        if not self._perturbed:
            raise RuntimeError("SAM.second_step called without first_step")
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)
        self._perturbed = False
        self._base.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One full SAM update; `closure` runs forward + backward and returns the loss (evaluated twice).

        Returns the loss at the unperturbed weights (the one worth logging).
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure (forward + backward); or call first_step/second_step")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum buffers...) and the shared param groups (with rho)."""
        return self._base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base.load_state_dict(state_dict)
        # Optimizer.load_state_dict rebuilds the group dicts: re-share them.
        self.param_groups = self._base.param_groups
        for group in self.param_groups:  # a checkpoint of the bare base optimizer has no SAM keys
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
        self.state = defaultdict(dict)
        self._perturbed = False

    def __getstate__(self) -> dict[str, Any]:  # keep the base optimizer through pickle / deepcopy
        state = super().__getstate__()
        state.update(_base=self._base, _perturbed=self._perturbed)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.param_groups = self._base.param_groups
