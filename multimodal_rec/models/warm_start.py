"""`init_from=<checkpoint>`: start training from an earlier model instead of from scratch (the nightly
fine-tune on every event so far: a few epochs instead of a full training).

The data may have changed since (new items, new events): every tensor of the same shape is copied; a tensor
indexed by item (the ID embedding: one row per item, then the padding row) is copied row by row for the items
both catalogues hold, matched by their lasting name (the shop's own id, else the item id), and new items keep
their fresh initialisation. Anything else whose shape changed (an attribute's vocabulary grew) starts fresh,
and the log says which. Only the weights are taken: optimiser, epoch and callbacks start anew.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from multimodal_rec.data.schema import item_keys
from multimodal_rec.models.loading import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)
ITEM_INDEXED = ("item_tower.id_embedding.weight",)  # one row per item (in the data's item order), then padding


@torch.no_grad()
def warm_start(model: torch.nn.Module, checkpoint_path: str | Path, items) -> dict:
    """Copies what fits of the checkpoint's weights into `model` (built for the data whose item table is
    `items`); returns counts: {"copied": tensors, "items_matched": rows, "fresh": [names]}."""
    checkpoint = read_checkpoint(checkpoint_path)
    saved, meta = checkpoint["state_dict"], checkpoint["multimodal_rec"]
    old_keys = meta.get("item_keys")
    old_row = {key: row for row, key in enumerate(old_keys)} if isinstance(old_keys, list) else None
    new_keys = item_keys(items)
    old_n, new_n = int(meta.get("n_items", -1)), len(new_keys)
    own = model.state_dict()
    copied, fresh, matched = 0, [], 0
    for name, tensor in own.items():
        value = saved.get(name)
        if value is None:
            fresh.append(name)
        elif (name in ITEM_INDEXED and old_row is not None and tensor.dim() == value.dim()
              and value.shape[1:] == tensor.shape[1:] and value.shape[0] - old_n == tensor.shape[0] - new_n >= 0):
            rows = torch.tensor([old_row.get(key, -1) for key in new_keys], dtype=torch.long)
            found = rows >= 0
            tensor[:new_n][found] = value[rows[found]]
            tensor[new_n:] = value[old_n:]  # the padding row(s) after the items
            matched, copied = int(found.sum()), copied + 1
        elif value.shape == tensor.shape:
            tensor.copy_(value)
            copied += 1
        else:
            fresh.append(name)
    if copied == 0:
        raise CheckpointError(f"{checkpoint_path} shares no weights with the model this config builds; "
                              "init_from takes a checkpoint of the same model")
    if fresh:
        log.warning("init_from %s: %d tensors start fresh (their shape changed): %s", checkpoint_path, len(fresh),
                    ", ".join(fresh[:8]))
    log.info("init_from %s: %d of %d tensors copied; %d of %d items matched by id", checkpoint_path, copied,
             len(own), matched, new_n)
    return {"copied": copied, "items_matched": matched, "fresh": fresh}
