"""Model creation by architecture name."""
from .factory import LoadReport, classifier, create_model, default_cfg, freeze_backbone, list_models, load_pretrained
from .heads import CosineLinear, am_softmax_scale

__all__ = ["CosineLinear", "LoadReport", "am_softmax_scale", "classifier", "create_model", "default_cfg", "freeze_backbone", "list_models", "load_pretrained"]
