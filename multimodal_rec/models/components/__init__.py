"""Plain nn.Modules (no Lightning, no Hydra): encoders, fusion, towers and the ranker."""
