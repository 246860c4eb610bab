"""Image-classification domain helpers shared by the work-dir scripts: template schema, flags, builders."""
