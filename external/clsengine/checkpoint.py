"""Checkpoints are plain dicts, written atomically and read back without executing pickled code."""
from __future__ import annotations

import importlib
import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .fileio import write_bytes


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Serialise in memory, write to a temporary file in the same folder, then rename: a crash never leaves a
    half file, and a full disk is one WriteError with the size needed (torch.save's own file writer reports
    it as an opaque RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_bytes(path, buffer.getvalue(), sync=True)


CHECKPOINT_FORMAT = "clsengine-checkpoint-v1"  # the "format" key of every checkpoint this engine writes
_FORMAT_PREFIX = "clsengine-checkpoint-v"


def check_format(state: dict[str, Any], path: str | os.PathLike) -> None:
    """A checkpoint written by a newer engine, in a format this one does not know, is refused with one line
    (older checkpoints and bare weight files carry no or an older format and load)."""
    found = state.get("format")
    if isinstance(found, str) and found.startswith(_FORMAT_PREFIX) and found != CHECKPOINT_FORMAT:
        version, ours = found.removeprefix(_FORMAT_PREFIX), CHECKPOINT_FORMAT.removeprefix(_FORMAT_PREFIX)
        if not (version.isdigit() and int(version) < int(ours)):
            raise CheckpointError(f"{path} is a checkpoint of format {found}, newer than this engine reads "
                                  f"({CHECKPOINT_FORMAT}): update the workbench (./init_venv.sh) to load it")


# Classes besides tensors and containers that a checkpoint of ours may hold, each a plain value type:
# NNCF's quantizer configuration (in compressed checkpoints) names its scheme with this enum.
TRUSTED_GLOBALS = ("nncf.common.quantization.structs.QuantizationScheme",)


def _trusted_globals(path: Path) -> list[type]:
    """The trusted classes this file refers to (imported only when it does); any other class stays refused."""
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file: torch.load reports it
        return []
    found = []
    for name in named:
        if name in TRUSTED_GLOBALS:
            module, _, attr = name.rpartition(".")
            found.append(getattr(importlib.import_module(module), attr))
    return found


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with `weights_only=True`: tensors, containers and primitives only, no arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with torch.serialization.safe_globals(_trusted_globals(path)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a loadable checkpoint: {first_line}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a dict (found {type(state).__name__})")
    check_format(state, path)
    return state


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model weights from a checkpoint of ours ('model' key), a {'state_dict': ...} file or a bare state dict."""
    state = load_checkpoint(path)
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no model weights")
    return tensors


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and primitives, so they pass weights_only loading."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state` into `model`; a mismatch is one CheckpointError that says what differs."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} tensor(s) of another shape (checkpoint vs model), e.g. {shapes[-1]}")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)
