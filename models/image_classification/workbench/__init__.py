"""Image-classification domain code shared by the work-dir scripts: the template schema, flags, `auto` values,
the adapters to the engine's factories, loaders, training and compression runs."""
__version__ = "0.1.0"
