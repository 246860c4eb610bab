"""Distributed data-parallel training on CPU (gloo): two processes keep identical weights, their gathered
validation equals one process's on the same weights, and train.py --gpu-num 2 trains and resumes."""
from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import yaml

from conftest import instantiate, run_script

CLASSES, FEATURES = 3, 8


class ToyData(torch.utils.data.Dataset):
    """Separable 3-class points; odd sizes so that shards differ in length."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % CLASSES
        self.x = torch.randn(n, FEATURES, generator=g) + 2.0 * nn.functional.one_hot(self.y, FEATURES).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import logging
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from clsengine import distributed as dist
    from clsengine.data import EpochLoader
    from clsengine.ema import create_ema
    from clsengine.loop import FitConfig, fit, validate
    from clsengine.recipe import Recipe
    from clsengine.optim import create_optimizer, create_scheduler

    info, device = dist.init_from_env(use_cuda=False)
    model = toy_model()
    train = EpochLoader(ToyData(61, seed=1), batch_size=8, shuffle=True, workers=0, seed=3, drop_last=True)
    val = EpochLoader(ToyData(23, seed=2), batch_size=8, shuffle=False, workers=0)
    optimizer = create_optimizer(model, "sgd", lr=0.1, sam_rho=0.05)   # SAM: two all-reduced passes per step
    scheduler = create_scheduler(optimizer, "cosine", 2, len(train))
    recipe = Recipe(ema=create_ema(model, decay=0.9))
    result = fit(model, train, val, nn.CrossEntropyLoss(), optimizer, scheduler, device,
                 FitConfig(epochs=2, output_dir=Path(out) / "fit", progress=False), logging.getLogger("dist"),
                 recipe=recipe)
    stats = validate(model, val, nn.CrossEntropyLoss(), device, progress=False)
    torch.save({"state": model.state_dict(), "ema": recipe.ema.state_dict(), "top1": stats["top1"],
                "history": result["history"], "steps": len(train)}, Path(out) / f"rank{rank}.pt")
    dist.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_hold_identical_weights_and_whole_metrics(tmp_path: Path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key          # parameters and BatchNorm buffers
    for key, value in ranks[0]["ema"].items():
        assert torch.equal(value, ranks[1]["ema"][key]), key
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3                  # 61 samples: 31 per rank, 3 batches of 8
    timing = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in row.items() if k not in timing} for row in ranks[0]["history"]] == \
        [{k: v for k, v in row.items() if k not in timing} for row in ranks[1]["history"]]
    assert (tmp_path / "fit" / "latest.pth").is_file()                  # written once, by rank 0

    # One process on rank 0's weights computes the same top-1 over all 23 validation samples.
    from clsengine.data import EpochLoader
    from clsengine.loop import validate

    model = toy_model()
    model.load_state_dict(ranks[0]["state"])
    val = EpochLoader(ToyData(23, seed=2), batch_size=8, shuffle=False, workers=0)
    assert validate(model, val, nn.CrossEntropyLoss(), torch.device("cpu"), progress=False)["top1"] == ranks[0]["top1"]


def test_epoch_sampler_shards_cover_the_epoch_once():
    from clsengine.data.loader import EpochSampler

    for weights in (None, [1.0] * 10 + [5.0] * 3):
        shards = [EpochSampler(13, True, seed=4, weights=weights, rank=r, world_size=3) for r in range(3)]
        for s in shards:
            s.set_epoch(2)
        full = EpochSampler(13, True, seed=4, weights=weights)
        full.set_epoch(2)
        order = list(full)
        assert [len(s) for s in shards] == [5, 5, 5]
        assert sorted(i for s in shards for i in s) == sorted(order + order[:2])   # padded with the first two
    evaluation = [EpochSampler(13, False, rank=r, world_size=3, pad=False) for r in range(3)]
    assert sorted(i for s in evaluation for i in s) == list(range(13)) and [len(s) for s in evaluation] == [5, 4, 4]


def test_train_py_with_two_processes_trains_and_resumes(tmp_path: Path, tiny_dataset: Path):
    wd = tmp_path / "wd"
    assert instantiate("resnet18", wd, "--do-not-load-snapshot").returncode == 0
    common = ["--train-data-roots", str(tiny_dataset / "train"), "--val-data-roots", str(tiny_dataset / "val"),
              "--gpu-num", "2", "--batch-size", "2", "--base-learning-rate", "0.01", "--workers", "0",
              "input.size=[32,32]", "training.scale_lr=linear"]
    result = run_script(wd, "train.py", *common, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "2 processes" in result.stdout and "learning rate 0.01 -> 0.02" in result.stdout
    assert result.stdout.count("epoch   1/1") == 1                        # one rank reports
    config = yaml.safe_load((wd / "outputs" / "config.yaml").read_text())
    assert config["run"]["processes"] == 2
    result = run_script(wd, "train.py", *common, "--epochs", "2", "--resume-from", "outputs/latest.pth")
    assert result.returncode == 0, result.stderr
    assert "Resuming after epoch 1" in result.stdout and "epoch   2/2" in result.stdout
    history = (wd / "outputs" / "history.csv").read_text().splitlines()
    assert len(history) == 3                                              # header + 2 epochs, no duplicates
