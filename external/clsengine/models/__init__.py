"""Model creation by architecture name."""
from .factory import (HEADS, LoadReport, backbone_stages, classifier, create_model, default_cfg, default_drop_path_rate,
                      forward_features, forward_head, freeze_backbone, freeze_stages, list_models, load_pretrained,
                      uses_depthwise, zero_init_residual)
from .heads import CosineLinear, am_softmax_scale

__all__ = ["CosineLinear", "HEADS", "LoadReport", "am_softmax_scale", "backbone_stages", "classifier", "create_model",
           "default_cfg", "default_drop_path_rate", "forward_features", "forward_head", "freeze_backbone",
           "freeze_stages", "list_models", "load_pretrained", "uses_depthwise", "zero_init_residual"]
