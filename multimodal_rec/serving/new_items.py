"""Item cold start at serving time: a new item's text, image and attributes -> the item tower's vector.

The inputs are coded exactly as data/features.py codes the catalogue (same tokenizer, image size,
vocabularies, numeric quantiles and frozen encoders, all saved in model.json + model.safetensors).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading

import numpy as np
import torch
from PIL import Image

from multimodal_rec.data.features import standardised_rank, tokenize
from multimodal_rec.data.images import to_tensor
from multimodal_rec.models.components.scoring import retrieval_vectors
from multimodal_rec.models.content_graph import nearest, unit_features
from multimodal_rec.serving.errors import RequestError

MAX_IMAGE_SIDE = 4096  # pixels a side: an upload decodes once at intake, at most 4096 x 4096 (50 MB as RGB)
MASTER_SIDE = 1024  # what is kept of an upload: pages show pictures at most 1024 wide
MASTER_BYTES = 1_000_000  # an upload already this small (and at most MASTER_SIDE a side) is kept as sent
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # the web's formats; Pillow's other decoders stay out of reach


def open_upload(encoded: str) -> tuple[Image.Image, bytes]:
    """(the upload opened lazily: header read, pixels not decoded; its bytes): a corrupt upload, or one larger
    than MAX_IMAGE_SIDE a side, is the client's error (422), found before any pixel is decoded."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(422, f"image_base64 is not valid base64: {error}") from error
    try:
        image = Image.open(io.BytesIO(raw), formats=FORMATS)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(422, f"image cannot be decoded ({', '.join(FORMATS)} are read): {error}") from error
    if image.width > MAX_IMAGE_SIDE or image.height > MAX_IMAGE_SIDE:
        image.close()
        raise RequestError(422, f"image too large: {image.width}x{image.height} pixels, at most "
                           f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}")
    return image, raw


def _decoded(image: Image.Image) -> Image.Image:
    """The RGB pixels of an opened upload (a truncated or corrupt one fails only now: 422)."""
    try:
        with image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(422, f"image cannot be decoded: {error}") from error


def decode_image(encoded: str, size: int) -> torch.Tensor:
    """base64 image bytes -> (1, 3, S, S) uint8; a corrupt or oversized upload is the client's error (422)."""
    picture = _decoded(open_upload(encoded)[0])
    return to_tensor(picture.resize((size, size), Image.Resampling.BILINEAR)).unsqueeze(0)


def normalized_image(encoded: str | None) -> str | None:
    """The upload as the service keeps it (base64), so that showing it never decodes more than MASTER_SIDE a side:
    as sent when it is already that small (and under MASTER_BYTES), else downscaled to MASTER_SIDE on its long
    side and re-encoded as JPEG. Refuses (422) what decode_image refuses."""
    if encoded is None:
        return None
    image, raw = open_upload(encoded)
    if max(image.size) <= MASTER_SIDE and len(raw) <= MASTER_BYTES:
        image.close()
        return encoded
    picture = _decoded(image)
    picture.thumbnail((MASTER_SIDE, MASTER_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class NewItemEncoder:
    """Codes a new item like the catalogue was coded and runs the item tower on it."""

    def __init__(self, parts: dict):
        self.parts = parts
        self.tower = parts["item_tower"]
        self._lock = threading.Lock()
        graph = parts.get("content_graph")  # float32 once here, not per request
        self._graph_units = [u.float() for u in graph["units"]] if graph is not None else None

    def _encoder(self, kind: str):
        encoder = self.parts["frozen_encoders"].get(kind)
        if encoder is None:
            raise RequestError(409, f"the artifacts hold no {kind} encoder, so new items cannot be encoded")
        return encoder

    @torch.no_grad()
    def inputs(self, text: str | None, image_base64: str | None, attributes: dict) -> dict:
        parts, vocab = self.parts, self.parts["vocabularies"]
        modalities = parts["modalities"]
        inputs = {"item": torch.tensor([parts["n_items"]]), "known": torch.tensor([False])}
        frozen = {}  # kind -> (frozen features (1, F), present): what content neighbours are found by
        if "image" in modalities:
            has_image = image_base64 is not None
            pixels = decode_image(image_base64, parts["image_size"]) if has_image else torch.zeros(
                1, 3, parts["image_size"], parts["image_size"], dtype=torch.uint8)
            if self.tower.image_encoder is not None:
                inputs["pixels"] = pixels
            else:
                encoder = self._encoder("image")
                inputs["image"] = encoder(pixels) if has_image else torch.zeros(1, encoder.out_dim)
                frozen["image"] = (inputs["image"], has_image)
            inputs["has_image"] = torch.tensor([has_image])
        if "text" in modalities:
            has_text = bool(text and text.strip())
            ids, mask = tokenize([text or ""], parts["text_tokenizer"], parts["max_text_len"])
            if self.tower.text_encoder is not None:
                inputs["text_ids"], inputs["text_mask"] = ids, mask
            else:
                inputs["text"] = self._encoder("text")(ids, mask)
                frozen["text"] = (inputs["text"], has_text)
            inputs["has_text"] = torch.tensor([has_text])
        if self.tower.neighbours:
            inputs["neighbours"], inputs["neighbour_weights"] = self._neighbours(frozen)
        inputs.update(self._attributes(vocab, attributes))
        return inputs

    def _neighbours(self, frozen: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The new item's content neighbours among the warm catalogue items, found as training found them;
        none (zero weights) when the artifacts did not keep the catalogue's features."""
        graph, k = self.parts.get("content_graph"), self.tower.neighbours
        if graph is None:
            return torch.zeros(1, k, dtype=torch.long), torch.zeros(1, k)
        queries = unit_features([frozen[kind][0] for kind in graph["kinds"]],
                                [torch.tensor([frozen[kind][1]]) for kind in graph["kinds"]])
        return nearest(queries, self._graph_units, graph["pool"], graph["k"])

    @staticmethod
    def _attributes(vocab: dict, attributes: dict) -> dict:
        known = {*vocab["categorical"], *vocab["multi_columns"], *vocab["numeric"]}
        unknown = sorted(set(attributes) - known)
        if unknown:
            raise RequestError(422, f"unknown item attributes {unknown}; known: {sorted(known)}")
        listed = sorted(n for n, v in attributes.items() if isinstance(v, list) and n not in vocab["multi_columns"])
        if listed:
            raise RequestError(422, f"attributes {listed} take one value each, got a list")
        categorical = torch.zeros(1, len(vocab["categorical"]), dtype=torch.long)
        for column, (name, values) in enumerate(vocab["categorical"].items()):
            value = attributes.get(name)
            if value is not None and str(value) in values:
                categorical[0, column] = values.index(str(value)) + 1
        multi = torch.zeros(1, len(vocab["multi"]))
        lookup = {v: i for i, v in enumerate(vocab["multi"])}
        for name in vocab["multi_columns"]:
            values = attributes.get(name) or []
            for value in values if isinstance(values, list) else [values]:
                if f"{name}={value}" in lookup:
                    multi[0, lookup[f"{name}={value}"]] = 1.0
        numeric = torch.zeros(1, len(vocab["numeric"]))
        missing = torch.ones(1, len(vocab["numeric"]), dtype=torch.bool)
        for column, (name, reference) in enumerate(vocab["numeric"].items()):
            value = attributes.get(name)
            if value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError) as error:
                raise RequestError(422, f"attribute {name!r} must be a number, got {value!r}") from error
            if not math.isfinite(number):  # "nan", "-inf", "1e999": the catalogue column would hold it
                raise RequestError(422, f"attribute {name!r} must be a finite number, got {value!r}")
            numeric[0, column], missing[0, column] = standardised_rank(reference, number), False
        return {"categorical": categorical, "multi_hot": multi, "numeric": numeric, "numeric_missing": missing}

    @torch.no_grad()
    def encode(self, text: str | None, image_base64: str | None, attributes: dict) -> tuple[np.ndarray,
                                                                                               np.ndarray | None]:
        """(vector (dim,): as exported (unit for cosine), + the bias with item biases; per-modality parts (M, d)
        or None)."""
        inputs = self.inputs(text, image_base64, attributes)
        captured = []
        fusion = getattr(self.tower, "fusion", None)
        with self._lock:  # the hook is shared state: one encoding at a time
            hook = fusion.register_forward_pre_hook(lambda m, args: captured.append(args[0])) if fusion else None
            try:
                raw = self.tower(inputs)
                vector = retrieval_vectors(raw, self.parts.get("score", "cosine"))[0]
            finally:
                if hook is not None:
                    hook.remove()
        parts = captured[0][0].half().numpy() if captured else None
        bias = self.parts.get("item_bias")
        if bias is not None or self.parts.get("cold_offset"):  # the column the exported item vectors carry
            column = bias(raw) if bias is not None else raw.new_zeros(1)
            vector = torch.cat([vector, column + self.parts.get("cold_offset", 0.0)])  # never trained on
        return vector.float().numpy(), parts
