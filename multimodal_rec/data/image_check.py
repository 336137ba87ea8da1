"""Whether an image file can be used, without importing torch (readers run before any model is built)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def image_problem(path: str | Path, min_side: int = 8) -> str | None:
    """Why the image file at `path` cannot be used (missing, corrupt, too small), or None when it decodes."""
    path = Path(path)
    if not path.is_file():
        return "file not found"
    try:
        with Image.open(path) as image:
            image.load()
            if image.width < min_side or image.height < min_side:
                return f"image too small ({image.width}x{image.height})"
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return str(error)[:80] or type(error).__name__
    return None
