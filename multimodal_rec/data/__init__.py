"""Readers of raw data, the canonical dataset, splits and the DataModule."""
