"""clsengine: the image-classification training engine."""
__version__ = "0.1.0"
