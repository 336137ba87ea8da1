"""FAISS indexes over exported item embeddings: build (with measured recall), load, search, add."""

from multimodal_rec.indexing.build import build_index
from multimodal_rec.indexing.item_index import IndexLoadError, ItemIndex, load_index
from multimodal_rec.indexing.spec import IndexSpec, index_names, load_spec

__all__ = ["IndexLoadError", "IndexSpec", "ItemIndex", "build_index", "index_names", "load_index", "load_spec"]
