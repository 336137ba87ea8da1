"""What index to build: a FAISS factory string and its build/search parameters (conf/index/*.yaml)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import faiss
from omegaconf import OmegaConf

from multimodal_rec.config import CONF_DIR
from multimodal_rec.embeddings import EmbeddingsError

log = logging.getLogger(__name__)

# k-means wants this many training points per centroid (FAISS warns below it).
MIN_POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class IndexSpec:
    """One index type. `factory` may name `{nlist}` and `{m}`, filled from `nlist` and `pq_m`.

    nlist: int, or "auto" = about 4 * sqrt(n), clipped so k-means gets enough training points.
    nprobe (IVF) and ef_search (HNSW) are search-time settings, stored in the index manifest and
    applied on load; ef_construction (HNSW) is build-time only.
    """

    name: str
    factory: str
    nlist: int | str | None = None
    pq_m: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    ef_construction: int | None = None
    train_size: int = 200_000

    def __post_init__(self) -> None:
        if "{nlist}" in self.factory and self.nlist is None:
            raise EmbeddingsError(f"index {self.name!r}: factory {self.factory!r} needs nlist (an int or 'auto')")
        if isinstance(self.nlist, str) and self.nlist != "auto":
            raise EmbeddingsError(f"index {self.name!r}: nlist must be an int or 'auto', got {self.nlist!r}")
        if "{m}" in self.factory and not (isinstance(self.pq_m, int) and self.pq_m > 0):
            raise EmbeddingsError(f"index {self.name!r}: factory {self.factory!r} needs pq_m (a positive int)")
        if self.train_size < 1:
            raise EmbeddingsError(f"index {self.name!r}: train_size must be positive, got {self.train_size}")

    def resolve(self, n: int, dim: int) -> tuple[str, dict]:
        """(factory string, resolved params) for `n` vectors of dimension `dim`."""
        train_rows = min(self.train_size, n)
        params = {}
        fill = {}
        if "{nlist}" in self.factory:
            wanted = round(4 * math.sqrt(n)) if self.nlist == "auto" else int(self.nlist)
            fill["nlist"] = params["nlist"] = max(1, min(wanted, train_rows // MIN_POINTS_PER_CENTROID))
        if "{m}" in self.factory:
            fill["m"] = params["pq_m"] = self._pq_m(dim)
        for key in ("nprobe", "ef_search", "ef_construction"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        try:  # an empty index of the same type: checks the string, says whether it needs training
            factory = self.factory.format(**fill)
            trains = not faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).is_trained
        except (KeyError, IndexError, ValueError) as error:
            raise EmbeddingsError(f"index {self.name!r}: factory {self.factory!r} names an unknown field "
                                  f"{error} (only {{nlist}} and {{m}})") from error
        except RuntimeError as error:
            raise EmbeddingsError(f"index {self.name!r}: FAISS rejects factory {factory!r}: {error}") from error
        params["train_rows"] = train_rows if trains else 0
        return factory, params

    def _pq_m(self, dim: int) -> int:
        """pq_m, or the nearest divisor of `dim` below it (PQ splits a vector into equal parts): an export with
        item biases is 65-d, and PQ13 there is as good as PQ16 at 64. Refused where that would be under half."""
        m = max((m for m in range(1, min(self.pq_m, dim) + 1) if dim % m == 0), default=1)
        if m * 2 <= self.pq_m or self.pq_m > dim:
            raise EmbeddingsError(f"index {self.name!r}: pq_m={self.pq_m} must divide the dimension {dim} "
                                  f"(the nearest divisor below it is {m}: index.pq_m={m})")
        if m != self.pq_m:
            log.warning("index %r: pq_m=%d does not divide the dimension %d; using pq_m=%d", self.name, self.pq_m,
                        dim, m)
        return m

    def to_dict(self) -> dict:
        return asdict(self)


def index_names() -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / "index").glob("*.yaml"))


def load_spec(name: str, **overrides) -> IndexSpec:
    """The spec of conf/index/<name>.yaml, with keyword overrides (e.g. nprobe=16)."""
    path = CONF_DIR / "index" / f"{name}.yaml"
    if not path.is_file():
        raise EmbeddingsError(f"unknown index {name!r}: choose one of {', '.join(index_names())}")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    config.pop("_target_", None)
    return IndexSpec(**{**config, **overrides})


def as_spec(spec: IndexSpec | dict | str) -> IndexSpec:
    """Accepts a spec, a config mapping (its `_target_` ignored) or a config name."""
    if isinstance(spec, IndexSpec):
        return spec
    if isinstance(spec, str):
        return load_spec(spec)
    config = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    config.pop("_target_", None)
    try:
        return IndexSpec(**config)
    except TypeError as error:
        raise EmbeddingsError(f"bad index config {config}: {error}") from error
