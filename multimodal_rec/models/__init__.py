"""LightningModules built from the plain components in `multimodal_rec.models.components`."""
