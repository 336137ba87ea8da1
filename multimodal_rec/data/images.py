"""Item images: a path relative to the dataset folder, or a `synthetic:` reference rendered on demand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from multimodal_rec.data.synthetic_images import is_synthetic_ref, render_synthetic_image


class ImageLoadError(ValueError):
    """An image that cannot be read or decoded; the message names it."""


def load_image(ref: str, root: str | Path, size: int) -> Image.Image:
    """The RGB image of `ref`, resized (squashed) to `size` x `size`."""
    if is_synthetic_ref(ref):
        return render_synthetic_image(ref, size)
    path = Path(root) / ref
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"cannot load image {path}: {error}") from error


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8: encoders normalise themselves."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class ItemImages(Dataset):
    """Images of the items that have one; a failed load gives zeros and `ok=False`, never a crash."""

    def __init__(self, refs: list, root: str | Path, size: int):
        self.indices = [i for i, ref in enumerate(refs) if ref is not None]
        self.refs, self.root, self.size = refs, root, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        try:
            pixels, ok = to_tensor(load_image(self.refs[index], self.root, self.size)), True
        except ImageLoadError:
            pixels, ok = torch.zeros(3, self.size, self.size, dtype=torch.uint8), False
        return {"index": torch.tensor(index), "pixels": pixels, "ok": torch.tensor(ok)}
