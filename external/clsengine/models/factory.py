"""create_model: torchvision architectures (and convnet_small) by name, with a fresh classifier and the options templates use."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

from ..checkpoint import load_state_dict_file
from ..errors import CheckpointError, UserError
from .batchnorm import batchnorms, warm_start
from .convnet import convnet_small
from .efficientnet_lite import efficientnet_lite0, from_efficientnet_pytorch, is_efficientnet_pytorch, npu_friendly
from .heads import am_softmax_scale, use_cosine_classifier

HEADS = ("linear", "cosine")  # the classifier: a linear layer, or L2-normalised features and weights (AM-softmax)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
LITE_MEAN, LITE_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)


@dataclass(frozen=True)
class ArchSpec:
    builder: Callable[..., nn.Module]
    head: str                      # attribute holding the classifier; everything else is the backbone
    trunk: tuple[str, ...] = ("features",)  # children run in order from the image to the last feature map
    takes_width: bool = False      # builder accepts width_mult
    takes_dropout: bool = False    # builder accepts dropout
    drop_path_rate: float = 0.0    # the architecture's stochastic depth (torchvision's default); 0: it has none
    depthwise: bool = False        # has depthwise convolutions (checked against the built model by the tests)
    default_cfg: dict = field(default_factory=lambda: {"input_size": (224, 224), "mean": IMAGENET_MEAN,
                                                       "std": IMAGENET_STD})
    # Maps a weights file in another naming onto the model's (checking it), when `foreign(state)` says it is one.
    foreign: Callable[[dict], bool] | None = None
    convert: Callable[[dict, nn.Module], dict] | None = None


def _npu(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A torchvision builder whose model is made NPU-friendly (no SE, ReLU) after construction (same arguments)."""
    def build(**kwargs) -> nn.Module:
        return npu_friendly(builder(**kwargs))
    build.__name__ = build.__qualname__ = f"{builder.__name__}_npu"
    return build


def _cfg(size: int) -> dict:
    return {"input_size": (size, size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_REGNET_TRUNK = ("stem", "trunk_output")


_ARCHS: dict[str, ArchSpec] = {
    "mobilenet_v3_large": ArchSpec(tvm.mobilenet_v3_large, "classifier", takes_width=True, takes_dropout=True,
                                  depthwise=True),
    "mobilenet_v3_small": ArchSpec(tvm.mobilenet_v3_small, "classifier", takes_width=True, takes_dropout=True,
                                  depthwise=True),
    "mobilenet_v2": ArchSpec(tvm.mobilenet_v2, "classifier", takes_width=True, takes_dropout=True,
                            depthwise=True),
    "efficientnet_b0": ArchSpec(tvm.efficientnet_b0, "classifier", takes_dropout=True, drop_path_rate=0.2,
                                depthwise=True),
    "efficientnet_b1": ArchSpec(tvm.efficientnet_b1, "classifier", takes_dropout=True, drop_path_rate=0.2,
                                depthwise=True, default_cfg=_cfg(240)),
    "efficientnet_b2": ArchSpec(tvm.efficientnet_b2, "classifier", takes_dropout=True, drop_path_rate=0.2,
                                depthwise=True, default_cfg=_cfg(260)),
    "efficientnet_b3": ArchSpec(tvm.efficientnet_b3, "classifier", takes_dropout=True, drop_path_rate=0.2,
                                depthwise=True, default_cfg=_cfg(300)),
    # Kneron-style NPU variants: no squeeze-and-excitation, ReLU instead of SiLU.
    "efficientnet_b0_npu": ArchSpec(_npu(tvm.efficientnet_b0), "classifier", takes_dropout=True,
                                    drop_path_rate=0.2, depthwise=True),
    "efficientnet_b1_npu": ArchSpec(_npu(tvm.efficientnet_b1), "classifier", takes_dropout=True,
                                    drop_path_rate=0.2, depthwise=True, default_cfg=_cfg(240)),
    "efficientnet_b2_npu": ArchSpec(_npu(tvm.efficientnet_b2), "classifier", takes_dropout=True,
                                    drop_path_rate=0.2, depthwise=True, default_cfg=_cfg(260)),
    "efficientnet_b3_npu": ArchSpec(_npu(tvm.efficientnet_b3), "classifier", takes_dropout=True,
                                    drop_path_rate=0.2, depthwise=True, default_cfg=_cfg(300)),
    "resnet18": ArchSpec(tvm.resnet18, "fc", trunk=_RESNET_TRUNK),
    "resnet34": ArchSpec(tvm.resnet34, "fc", trunk=_RESNET_TRUNK),
    "resnet50": ArchSpec(tvm.resnet50, "fc", trunk=_RESNET_TRUNK),
    "regnet_x_800mf": ArchSpec(tvm.regnet_x_800mf, "fc", trunk=_REGNET_TRUNK),
    "regnet_y_800mf": ArchSpec(tvm.regnet_y_800mf, "fc", trunk=_REGNET_TRUNK),
    # EfficientNet-Lite0 (no SE, ReLU6): its ImageNet weights install with the workbench, in EfficientNet-PyTorch's
    # names; they were trained on inputs scaled as (x - 127) / 128 (TensorFlow's Lite preprocessing).
    "efficientnet_lite0": ArchSpec(efficientnet_lite0, "classifier", takes_dropout=True, drop_path_rate=0.2,
                                   depthwise=True, foreign=is_efficientnet_pytorch, convert=from_efficientnet_pytorch,
                                   default_cfg={"input_size": (224, 224), "mean": LITE_MEAN, "std": LITE_STD}),
    # For small images (28-64 px): full resolution until two max-pools, no stem to make stride 1.
    "convnet_small": ArchSpec(convnet_small, "classifier", takes_width=True, takes_dropout=True,
                              default_cfg=_cfg(32)),
}


def list_models() -> list[str]:
    return sorted(_ARCHS)


def default_drop_path_rate(name: str) -> float:
    """The architecture's own stochastic-depth rate (0.0 for those without stochastic depth)."""
    return _spec(name).drop_path_rate


def uses_depthwise(name: str) -> bool:
    """Whether the architecture has depthwise convolutions (MobileNets, EfficientNets), whose kernels behave
    unlike dense ones under mixed precision on CPUs."""
    return _spec(name).depthwise


def default_cfg(name: str) -> dict:
    """The architecture's own input defaults (size, mean, std on the 0..255 scale)."""
    return dict(_spec(name).default_cfg)


def _spec(name: str) -> ArchSpec:
    if name not in _ARCHS:
        raise UserError(f"unknown architecture '{name}'; known: {', '.join(list_models())}")
    return _ARCHS[name]


def _make_small_input(model: nn.Module) -> None:
    """Keep resolution for tiny inputs such as 32x32: stem stride 1, so every architecture downsamples 16x
    instead of 32x and ends on a 2x2 feature map at 32 px. ResNets keep their max-pool: without it (stride 8,
    the CIFAR ResNet) every layer runs on 16x the pixels, several times slower per image than keeping it."""
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.stride = (1, 1)


def zero_init_residual(model: nn.Module) -> nn.Module:
    """Zero the scale of the last BatchNorm of every residual branch, so that each residual block starts as
    the identity (Goyal et al. 2017; timm's `zero_init_last`): a deep network trained from scratch then behaves
    like a shallow one in its first steps and converges in far fewer of them."""
    for module in model.modules():
        if getattr(module, "use_res_connect", False):        # MobileNetV2/V3 InvertedResidual, EfficientNet MBConv
            branch = module.block if hasattr(module, "block") else module.conv
        elif isinstance(module, (tvm.resnet.BasicBlock, tvm.resnet.Bottleneck)):
            branch = nn.ModuleList([module.bn2 if isinstance(module, tvm.resnet.BasicBlock) else module.bn3])
        elif isinstance(module, tvm.regnet.ResBottleneckBlock):
            branch = module.f
        else:
            continue
        norms = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)]
        if norms:
            nn.init.zeros_(norms[-1].weight)
    return model


def create_model(name: str, num_classes: int, *, width_mult: float = 1.0, dropout: float | None = None,
                 small_input: bool = False, bn_momentum: float | None = None, head: str = "linear",
                 drop_path_rate: float | None = None,
                 cosine_scale: float | None = None, pretrained: str | os.PathLike | None = None) -> nn.Module:
    """Build a torchvision architecture with a `num_classes` classifier.

    `pretrained` is a local weights file (a checkpoint or a state dict); layers whose shapes do not
    match (the classifier, when the class count differs) keep their fresh initialisation.
    `head="cosine"` replaces the last linear layer by a CosineLinear (scale `cosine_scale`, by default
    the AM-softmax rule for `num_classes`), the classifier the AM-softmax loss needs.
    `drop_path_rate` replaces the architecture's stochastic-depth rate (None keeps it; only EfficientNets
    have one). Every residual branch starts at zero (zero_init_residual).
    `bn_momentum` replaces the architecture's BatchNorm momentum (torchvision's MobileNetV3 uses 0.01,
    tuned for long ImageNet runs, which leaves running statistics unusable after short runs). Running
    statistics start as a cumulative average of the first batches (models.batchnorm: not from mean 0, var 1).
    The model carries `default_cfg` (input size, mean, std) and `head_name` (its classifier attribute).
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be positive, got {num_classes}")
    spec = _spec(name)
    kwargs: dict = {"num_classes": num_classes}
    if spec.takes_width:
        kwargs["width_mult"] = float(width_mult)
    elif width_mult != 1.0:
        raise UserError(f"architecture '{name}' has no width multiplier (got width_mult={width_mult})")
    if spec.takes_dropout and dropout is not None:
        kwargs["dropout"] = float(dropout)
    if drop_path_rate is not None and drop_path_rate != spec.drop_path_rate:
        if not spec.drop_path_rate:
            raise UserError(f"architecture '{name}' has no stochastic depth (got drop_path_rate={drop_path_rate})")
        kwargs["stochastic_depth_prob"] = float(drop_path_rate)
    model = spec.builder(weights=None, **kwargs)
    if dropout and not spec.takes_dropout:
        setattr(model, spec.head, nn.Sequential(nn.Dropout(float(dropout)), getattr(model, spec.head)))
    if small_input:
        _make_small_input(model)
    zero_init_residual(model)
    if bn_momentum is not None:
        for module in batchnorms(model):
            module.momentum = float(bn_momentum)
    warm_start(model)
    model.default_cfg = dict(spec.default_cfg)
    model.head_name = spec.head
    model.arch_name = name
    if head == "cosine":
        use_cosine_classifier(model, cosine_scale if cosine_scale is not None else am_softmax_scale(num_classes))
    elif head != "linear":
        raise UserError(f"unknown head '{head}'; known: {', '.join(HEADS)}")
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def classifier(model: nn.Module) -> nn.Module:
    """The model's classification head (what stays trainable when the backbone is frozen)."""
    return getattr(model, getattr(model, "head_name"))


def forward_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map (N, C, h, w) of a create_model() model, before global pooling: what
    saliency methods look at (timm's `forward_features`). forward_head(model, forward_features(model, x))
    is model(x) for every architecture (tests/test_explain.py checks it)."""
    x = images
    for name in _spec(model.arch_name).trunk:
        x = getattr(model, name)(x)
    return x


def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """The backbone's stages from the image to the last feature map: the children of a `features` Sequential
    (MobileNets, EfficientNets), or the trunk's named parts (ResNets, RegNets)."""
    parts: list[nn.Module] = []
    for name in _spec(model.arch_name).trunk:
        part = getattr(model, name)
        parts.extend(part.children() if name == "features" else [part])
    return parts


def forward_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Logits from a feature map: global average pooling, then the classifier, as every architecture here
    ends (timm's `forward_head`). A (N, C, 1, 1) input is a feature map already pooled."""
    return classifier(model)(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


def freeze_stages(model: nn.Module, trainable: int | None, freeze_bn: bool) -> int:
    """Train only the head and the last `trainable` stages (None: every layer); with `freeze_bn`, every
    BatchNorm layer keeps its weights and running statistics. Returns the number of trainable tensors."""
    parts = backbone_stages(model)
    frozen = parts if trainable == 0 else parts[:-trainable] if trainable else []
    for part in frozen:
        for p in part.parameters():
            p.requires_grad_(False)
    if freeze_bn:
        for bn in batchnorms(model):
            for p in bn.parameters():
                p.requires_grad_(False)
    return sum(p.requires_grad for p in model.parameters())


def freeze_backbone(model: nn.Module) -> None:
    """Train the classifier alone (training.freeze_backbone)."""
    freeze_stages(model, 0, freeze_bn=False)


# A weights file must fill at least this share of the backbone's tensors (by name and shape): below it, it
# is another architecture or width, and "fine-tuning" from it would silently train mostly from scratch.
MIN_BACKBONE_MATCH = 0.5


@dataclass
class LoadReport:
    """What a weights file gave a model: tensors loaded, left at their initial values, and not used."""
    path: str
    loaded: list[str]
    missing: list[str]              # the model's tensors left at initialisation (e.g. a new classifier)
    unused: list[str]               # the file's tensors with no place in the model (other name or shape)
    total: int                      # tensors of the model

    def describe(self, limit: int = 6) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
        text = f"{self.path}: loaded {len(self.loaded)} of the model's {self.total} tensors"
        if self.missing:
            text += f"; left at their initial values: {names(self.missing)}"
        if self.unused:
            text += f"; {len(self.unused)} tensor(s) of the file not used: {names(self.unused)}"
        return text


def load_pretrained(model: nn.Module, path: str | os.PathLike,
                    min_backbone_match: float = MIN_BACKBONE_MATCH) -> LoadReport:
    """Copy matching tensors from a weights file into `model` and say what was loaded and what was not.

    Tensors match by name and shape; the classifier of another class count keeps its initialisation. A file
    that fills less than `min_backbone_match` of the backbone's tensors is refused (another architecture or
    width: a torchvision mobilenet_v3_large state dict fills 70 of 312 tensors of a width-0.75 model)."""
    state = load_state_dict_file(path)
    spec = _ARCHS.get(getattr(model, "arch_name", ""))
    if spec is not None and spec.foreign is not None and spec.foreign(state):
        try:
            state = spec.convert(state, model)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    head = f"{getattr(model, 'head_name', '')}."
    backbone = [k for k in own if not k.startswith(head)]
    filled = sum(1 for k in backbone if k in matched)
    arch = getattr(model, "arch_name", "?")
    if not matched:
        raise CheckpointError(f"{path}: no tensor matches the model '{arch}' "
                              f"(is it a checkpoint of another architecture?)")
    if backbone and filled < min_backbone_match * len(backbone):
        raise CheckpointError(f"{path}: only {filled} of the {len(backbone)} backbone tensors of '{arch}' match by "
                              f"name and shape (at least {min_backbone_match:.0%} needed); is it a checkpoint of "
                              f"another architecture or width multiplier?")
    model.load_state_dict(matched, strict=False)
    for name, module in model.named_modules():  # real running statistics: no cumulative start (models.batchnorm)
        if f"{name}.running_mean" in matched and getattr(module, "target_momentum", None) is not None:
            module.momentum = module.target_momentum
    return LoadReport(path=str(path), loaded=sorted(matched), missing=sorted(set(own) - set(matched)),
                      unused=sorted(set(state) - set(matched)), total=len(own))
