"""multimodal_rec: a multimodal deep recommender (image CNN + text transformer + history RNN)."""

__version__ = "0.1.0"
