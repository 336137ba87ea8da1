"""Transformer text encoder: token ids -> masked-mean-pooled sentence vector.

Reference: Reimers & Gurevych, "Sentence-BERT", EMNLP 2019 (all-MiniLM-L6-v2, mean pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from multimodal_rec.data.features import resolve_tokenizer_path
from multimodal_rec.safe_modules import rebuildable

# all-MiniLM-L6-v2's architecture, to build it randomly initialised without its files
MINILM_L6 = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
             "intermediate_size": 1536, "max_position_embeddings": 512, "hidden_act": "gelu"}


@rebuildable
class TextEncoder(nn.Module):
    """model: "minilm" (pretrained all-MiniLM-L6-v2 from PyPI) or a local HF folder. With
    pretrained=False the same architecture is randomly initialised; `tiny_layers/tiny_hidden` shrink it
    (tests). `trainable_layers` unfreezes the top N transformer layers (-1: all)."""

    def __init__(self, model: str = "minilm", pretrained: bool = True, trainable_layers: int = 0,
                 tiny_hidden: int | None = None, tiny_layers: int = 2):
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig

        if pretrained:
            self.net = AutoModel.from_pretrained(resolve_tokenizer_path(model))
        else:
            # a local folder only, never the hub: modules are rebuilt this way when artifacts are served
            config = BertConfig(**MINILM_L6) if model == "minilm" else AutoConfig.from_pretrained(
                resolve_tokenizer_path(model), local_files_only=True)
            if tiny_hidden:
                config.update({"hidden_size": tiny_hidden, "num_hidden_layers": tiny_layers,
                               "num_attention_heads": 2, "intermediate_size": tiny_hidden * 2})
            self.net = AutoModel.from_config(config)
        self.out_dim = self.net.config.hidden_size
        self.requires_grad_(False)
        layers = self.net.encoder.layer
        n_train = len(layers) if trainable_layers < 0 else min(trainable_layers, len(layers))
        for layer in list(layers)[len(layers) - n_train:]:
            layer.requires_grad_(True)
        self.trainable = n_train > 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.net(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, H)
