"""Model creation by architecture name."""
from .factory import classifier, create_model, default_cfg, freeze_backbone, list_models, load_pretrained

__all__ = ["classifier", "create_model", "default_cfg", "freeze_backbone", "list_models", "load_pretrained"]
