"""SAM optimizer and weight EMA: update formulas checked against hand computation, checkpoint round trips."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from clsengine.ema import ModelEma, create_ema, ema_decay
from clsengine.optim.sam import SAM
from clsengine.optim.scheduler import LRSchedule


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def grads(params) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1) for p in params])


def mlp(seed: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def batches(n: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(6, 4, generator=g, dtype=dtype), torch.randn(6, 2, generator=g, dtype=dtype))
            for _ in range(n)]


def sam_update(model: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor, max_norm: float | None = None) -> float:
    """The training-loop usage documented in optim/sam.py."""
    loss = F.mse_loss(model(x), y)
    loss.backward()
    if max_norm:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    if max_norm:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.second_step(zero_grad=True)
    return loss.item()


# --------------------------------------------------------------------------- SAM: the update itself


def test_negative_rho_rejected():
    with pytest.raises(ValueError):
        SAM(nn.Linear(2, 1).parameters(), torch.optim.SGD, rho=-0.01, lr=0.1)


def test_first_step_moves_by_rho_along_normalised_gradient():
    model, (x, y) = mlp(0), batches(1)[0]
    params = list(model.parameters())
    opt = SAM(params, torch.optim.SGD, rho=0.07, lr=0.1)
    F.mse_loss(model(x), y).backward()
    w0, g = flat(params), grads(params)
    opt.first_step(zero_grad=True)
    d = flat(params) - w0
    assert torch.linalg.vector_norm(d).item() == pytest.approx(0.07, rel=1e-9)
    torch.testing.assert_close(d, 0.07 * g / torch.linalg.vector_norm(g), rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in params)  # zero_grad=True uses set_to_none


def test_one_sam_step_equals_hand_computation_on_a_quadratic():
    # loss(w) = 1/2 w^T A w - b^T w, so grad(w) = A w - b in closed form.
    torch.manual_seed(1)
    m = torch.randn(5, 5, dtype=torch.float64)
    a, b = m @ m.T + torch.eye(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    w = nn.Parameter(torch.randn(5, dtype=torch.float64))
    w0, lr, rho = w.detach().clone(), 0.05, 0.2
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr, momentum=0.0)

    def loss_fn():
        return 0.5 * w @ a @ w - b @ w

    loss_fn().backward()
    g = a @ w0 - b
    torch.testing.assert_close(w.grad, g)
    opt.first_step(zero_grad=True)
    e = rho * g / g.norm()
    torch.testing.assert_close(w.detach(), w0 + e, rtol=1e-10, atol=1e-12)
    loss_fn().backward()
    g_adv = a @ (w0 + e) - b
    torch.testing.assert_close(w.grad, g_adv)
    opt.second_step(zero_grad=True)
    # restored to w0 before the base step: w0 - lr * g(w0 + e), not (w0 + e) - lr * g(w0 + e)
    torch.testing.assert_close(w.detach(), w0 - lr * g_adv, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(w.detach(), w0 - lr * g)  # and it is not the plain SGD step


def test_one_sam_step_equals_hand_computation_on_a_network():
    model, (x, y) = mlp(2), batches(1)[0]
    names = [n for n, _ in model.named_parameters()]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, rho = 0.1, 0.05

    def grad_at(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        leaves = {n: t.clone().requires_grad_(True) for n, t in weights.items()}
        loss = F.mse_loss(torch.func.functional_call(model, leaves, (x,)), y)
        return dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))

    g = grad_at(w0)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    g_adv = grad_at({n: w0[n] + rho * g[n] / norm for n in names})
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    sam_update(model, opt, x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w0[n] - lr * g_adv[n], rtol=1e-10, atol=1e-12)


def test_adaptive_displacement_is_asam():
    model, (x, y) = mlp(3), batches(1)[0]
    params = list(model.parameters())
    opt = SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    F.mse_loss(model(x), y).backward()
    w0, g = flat(params), grads(params)
    opt.first_step()
    expected = 0.5 * w0 ** 2 * g / torch.linalg.vector_norm(w0 * g)
    torch.testing.assert_close(flat(params) - w0, expected, rtol=1e-9, atol=1e-14)
    assert not torch.allclose(expected, 0.5 * g / g.norm())  # the test distinguishes ASAM from SAM
    opt.second_step()
    # the adaptive ball has radius rho in the |w|-rescaled metric: ||e / |w| || == rho
    torch.testing.assert_close(torch.linalg.vector_norm(expected / w0.abs()),
                               torch.tensor(0.5, dtype=torch.float64))


def test_step_with_closure_equals_first_and_second_step():
    data = batches(3)
    manual, closed = mlp(4), mlp(4)
    opt_m = SAM(manual.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_c = SAM(closed.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in data:
        loss_m = sam_update(manual, opt_m, x, y)

        def closure():
            loss = F.mse_loss(closed(x), y)
            loss.backward()
            return loss

        with torch.no_grad():  # step re-enables grad for the closure
            loss_c = opt_c.step(closure)
        assert loss_c.item() == loss_m
    for a, b in zip(manual.parameters(), closed.parameters()):
        assert torch.equal(a, b)


def test_step_without_closure_and_misuse_raise():
    model, (x, y) = mlp(5), batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError):
        opt.step()
    with pytest.raises(RuntimeError):
        opt.second_step()
    F.mse_loss(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError):
        opt.first_step()  # would lose the saved weights


def test_zero_grad_set_to_none_and_zeros():
    model, (x, y) = mlp(6), batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    F.mse_loss(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- SAM: param groups, LR, checkpoints


def test_param_groups_are_shared_with_base_optimizer():
    w1 = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    w2 = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = SAM([{"params": [w1], "weight_decay": 0.1}, {"params": [w2], "weight_decay": 0.0}],
              torch.optim.SGD, rho=0.0, lr=0.01)
    base = opt.base_optimizer
    assert isinstance(base, torch.optim.SGD)
    assert [g["weight_decay"] for g in base.param_groups] == [0.1, 0.0]
    assert all(a is b for a, b in zip(opt.param_groups, base.param_groups))
    opt.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5 and base.param_groups[1]["lr"] == 0.01
    # rho=0: no perturbation, so the update is plain SGD with each group's lr and weight decay
    ((w1 ** 2).sum() + (w2 ** 3).sum()).backward()
    opt.first_step()
    opt.second_step()
    torch.testing.assert_close(w1.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64) * (1 - 0.5 * (2 + 0.1)))
    torch.testing.assert_close(w2.detach(), torch.tensor([0.5 - 0.01 * 3 * 0.25], dtype=torch.float64))


def test_engine_scheduler_drives_base_optimizer_lr():
    model = mlp(7)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=1.0, momentum=0.9)
    sched = LRSchedule(opt, "cosine", epochs=1, iters_per_epoch=10, warmup_epochs=0.5, warmup_factor=0.1)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(5):
        sched.step_iter()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    assert opt.base_optimizer.param_groups[0]["initial_lr"] == 1.0


def _checkpoint_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("base_cls, kwargs", [(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
                                              (torch.optim.AdamW, {"lr": 0.01})])
def test_state_dict_round_trip_resumes_exactly(base_cls, kwargs):
    data = batches(5)

    def new_run(seed):
        model = mlp(seed)
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return model, SAM(groups, base_cls, rho=0.05, **kwargs)

    ref_model, ref_opt = new_run(8)
    for x, y in data:
        sam_update(ref_model, ref_opt, x, y)

    model, opt = new_run(8)
    for x, y in data[:3]:
        sam_update(model, opt, x, y)
    checkpoint = _checkpoint_bytes({"model": model.state_dict(), "optimizer": opt.state_dict()})
    saved = opt.state_dict()
    assert len(saved["state"]) == len(list(model.parameters()))  # the base optimizer's buffers are saved
    assert saved["param_groups"][1]["weight_decay"] == 0.0 and saved["param_groups"][0]["rho"] == 0.05

    resumed_model, resumed_opt = new_run(99)  # different init: everything must come from the checkpoint
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    resumed_model.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    assert all(a is b for a, b in zip(resumed_opt.param_groups, resumed_opt.base_optimizer.param_groups))
    assert resumed_opt.base_optimizer.state  # momentum / Adam moments restored into the base optimizer
    for x, y in data[3:]:
        sam_update(resumed_model, resumed_opt, x, y)
    for a, b in zip(ref_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)

    # control: losing the optimizer state changes the result, so the check above is meaningful
    lost_model, lost_opt = new_run(99)
    lost_model.load_state_dict(state["model"])
    for x, y in data[3:]:
        sam_update(lost_model, lost_opt, x, y)
    assert not torch.equal(flat(ref_model.parameters()), flat(lost_model.parameters()))


def test_lr_written_after_resume_reaches_base_optimizer():
    model, (x, y) = mlp(9), batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sam_update(model, opt, x, y)
    fresh = SAM(mlp(9).parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    fresh.load_state_dict(opt.state_dict())
    fresh.param_groups[0]["lr"] = 0.003
    assert fresh.base_optimizer.param_groups[0]["lr"] == 0.003


def test_deepcopy_keeps_base_optimizer_linked():
    model, (x, y) = mlp(10), batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sam_update(model, opt, x, y)
    clone = copy.deepcopy(opt)
    assert clone.param_groups is clone.base_optimizer.param_groups
    assert clone.base_optimizer is not opt.base_optimizer
    clone.param_groups[0]["lr"] = 0.7
    assert clone.base_optimizer.param_groups[0]["lr"] == 0.7 and opt.param_groups[0]["lr"] == 0.1


# --------------------------------------------------------------------------- SAM: clipping and mixed precision


def test_gradient_clipping_between_steps():
    model, (x, y) = mlp(11), batches(1)[0]
    params = list(model.parameters())
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)
    w0 = flat(params)
    F.mse_loss(model(x) * 100, y).backward()  # large gradients, so clipping is active
    nn.utils.clip_grad_norm_(params, 0.01)
    opt.first_step(zero_grad=True)
    assert torch.linalg.vector_norm(flat(params) - w0).item() == pytest.approx(0.05, rel=1e-9)
    F.mse_loss(model(x) * 100, y).backward()
    nn.utils.clip_grad_norm_(params, 0.01)
    opt.second_step(zero_grad=True)
    w1 = flat(params)
    assert torch.isfinite(w1).all()
    # restored, then stepped with the clipped gradient: ||w1 - w0|| = lr * 0.01
    assert torch.linalg.vector_norm(w1 - w0).item() == pytest.approx(0.1 * 0.01, rel=1e-6)


def test_autocast_bfloat16_decreases_loss():
    torch.manual_seed(12)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.mse_loss(model(x).float(), y).backward()
        opt.second_step(zero_grad=True)
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------- EMA


def test_ema_decay_warmup_schedule():
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(8, 0.999) == pytest.approx(0.5)
    assert ema_decay(10_000, 0.999) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999
    assert ema_decay(5, 0.2) == 0.2  # capped by decay


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_of_a_constant_model_is_that_model():
    model = nn.Linear(3, 2)
    ema = create_ema(model, decay=0.9)
    assert isinstance(ema, AveragedModel)
    for _ in range(5):  # a model that never moves: the average never drifts
        ema.update_parameters(model)
    for a, b in zip(ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(a, b)
    _set(model, 0.25)  # a new constant: the gap shrinks by d_n per update, down to nothing
    gap0 = flat(ema.module.parameters()) - 0.25
    ema.update_parameters(model)
    torch.testing.assert_close(flat(ema.module.parameters()) - 0.25, ema_decay(5, 0.9) * gap0)
    for _ in range(300):
        ema.update_parameters(model)
    torch.testing.assert_close(flat(ema.module.parameters()), torch.full_like(gap0, 0.25))


@pytest.mark.parametrize("warmup, d0", [(True, 0.1), (False, 0.999)])
def test_ema_first_update(warmup, d0):
    model = nn.Linear(3, 2)
    ema = create_ema(model, decay=0.999, warmup=warmup)
    ema0 = flat(ema.module.parameters())
    _set(model, 1.5)
    ema.update_parameters(model)
    torch.testing.assert_close(flat(ema.module.parameters()), d0 * ema0 + (1 - d0) * 1.5)
    assert ema.num_updates == 1


@pytest.mark.parametrize("decay, ds", [(0.999, (1 / 10, 2 / 11, 3 / 12)), (0.15, (0.1, 0.15, 0.15))])
def test_ema_three_updates_by_hand(decay, ds):
    model = nn.Linear(2, 1, bias=False)
    _set(model, 2.0)
    ema = create_ema(model, decay=decay)
    expected = 2.0
    for value, d in zip((4.0, -1.0, 0.5), ds):
        _set(model, value)
        ema.update_parameters(model)
        expected = d * expected + (1 - d) * value
        torch.testing.assert_close(ema.module.weight, torch.full((1, 2), expected))


def test_ema_averages_batchnorm_buffers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = create_ema(model, decay=0.999)
    bn, ema_bn = model[1], ema.module[1]
    mean0, var0 = ema_bn.running_mean.clone(), ema_bn.running_var.clone()
    model.train()
    model(torch.randn(16, 3) * 3 + 2)
    model(torch.randn(16, 3) * 3 + 2)
    assert not torch.allclose(bn.running_mean, mean0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema_bn.running_mean, 0.1 * mean0 + 0.9 * bn.running_mean)
    torch.testing.assert_close(ema_bn.running_var, 0.1 * var0 + 0.9 * bn.running_var)
    assert ema_bn.num_batches_tracked.item() == 2  # an integer counter is copied, not averaged


def test_ema_state_dict_round_trip():
    model = mlp(13, dtype=torch.float32)
    ema = create_ema(model, decay=0.99)
    for value in (0.1, 0.2, 0.3):
        _set(model, value)
        ema.update_parameters(model)
    state = torch.load(io.BytesIO(_checkpoint_bytes(ema.state_dict())), weights_only=True)
    assert int(state["n_averaged"]) == 4 and ema.num_updates == 3

    restored = create_ema(mlp(14, dtype=torch.float32), decay=0.99)
    restored.load_state_dict(state)
    assert restored.num_updates == 3
    _set(model, 0.7)
    ema.update_parameters(model)
    restored.update_parameters(model)
    for a, b in zip(ema.module.parameters(), restored.module.parameters()):
        assert torch.equal(a, b)
    # and the warm-up continued from update 3 (d_3 = 4/13), not from the start
    expected = flat(mlp(13, dtype=torch.float32).parameters())
    for n, value in enumerate((0.1, 0.2, 0.3, 0.7)):
        expected = ema_decay(n, 0.99) * expected + (1 - ema_decay(n, 0.99)) * value
    torch.testing.assert_close(flat(restored.module.parameters()), expected)


def test_ema_module_is_a_frozen_copy():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(5, 3)).sum().backward()
    ema = create_ema(model)
    assert isinstance(ema, ModelEma)
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    for p in ema.module.parameters():
        assert not p.requires_grad and p.grad is None
        assert p.data_ptr() not in model_ptrs
    before = flat(ema.module.parameters())
    _set(model, 9.0)  # editing the model in place does not touch the average
    assert torch.equal(flat(ema.module.parameters()), before)
    assert not ema.module.training
    tracked = ema.module[1].num_batches_tracked.item()
    ema.module(torch.randn(5, 3))  # eval-mode forward works and leaves BN stats alone
    assert ema.module[1].num_batches_tracked.item() == tracked
