"""Readers of raw formats; each returns a `RawDataset` (see `multimodal_rec.data.schema`)."""
