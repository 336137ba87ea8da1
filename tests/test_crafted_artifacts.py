"""Artifact folders crafted by whoever can write the artifacts root: each is refused with a one-line ArtifactsError
that names the file, fast, without allocating what it declares, fetching anything or reading outside the folder.

Each test is the attack: a copy of the tiny export with one file crafted, and the manifest's checksums made to match
(the attacker writes those too), so that what stops it is the check under test, not the checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load, save

from multimodal_rec import embeddings as emb
from multimodal_rec.config import PROJECT_ROOT
from multimodal_rec.models.components.text_encoder import TextEncoder
from multimodal_rec.serving.artifacts import ArtifactsError, load_artifacts
from multimodal_rec.serving.catalog_api import image_source
from multimodal_rec.serving.model_files import CONFIG_FILE, FORMAT, WEIGHTS_FILE
from multimodal_rec.serving.parts import CATALOG_FILE, MODALITY_PARTS_FILE, SERVING_FILES, USERS_FILE
from tests.conftest import WritesAFile
from tests.conftest import copy_artifacts as _copy

TEXT = "frozen_encoders.text"




def _rehash(folder: Path) -> None:
    """The manifest's records made to match the crafted files, as an attacker who writes the manifest would."""
    manifest = json.loads((folder / emb.MANIFEST_FILE).read_text())
    manifest["files"] = {name: emb.file_record(folder / name) for name in SERVING_FILES if (folder / name).is_file()}
    (folder / emb.MANIFEST_FILE).write_text(json.dumps(manifest))


def _edit_json(folder: Path, name: str, change) -> None:
    payload = json.loads((folder / name).read_text())
    change(payload)
    (folder / name).write_text(json.dumps(payload))
    _rehash(folder)


def _edit_weights(folder: Path, change) -> None:
    tensors = dict(load((folder / WEIGHTS_FILE).read_bytes()))
    change(tensors)
    data = save(tensors, metadata={"format": FORMAT})
    (folder / WEIGHTS_FILE).write_bytes(data)
    _edit_json(folder, CONFIG_FILE, lambda config: config.update(weights_sha256=hashlib.sha256(data).hexdigest()))


def _refused(folder: Path, match: str, seconds: float = 30.0) -> str:
    started = time.perf_counter()
    with pytest.raises(ArtifactsError, match=match) as caught:
        load_artifacts(folder)
    message = str(caught.value)
    assert "\n" not in message and time.perf_counter() - started < seconds
    return message


def _item_tower_args(config: dict) -> dict:
    return config["modules"]["item_tower"]["args"]


SIZE_ATTACKS = {  # name -> (file, change)
    "tower_n_items_1e12": (CONFIG_FILE, lambda c: _item_tower_args(c).update(n_items=10**12)),
    "tower_n_items_12M": (CONFIG_FILE, lambda c: _item_tower_args(c).update(n_items=12_000_000)),
    "n_items_1e12": (CONFIG_FILE, lambda c: c.update(n_items=10**12)),
    "layers_1e9": (CONFIG_FILE, lambda c: c["modules"]["history_encoder"]["args"].update(num_layers=10**9)),
    "text_layers_1e6": (CONFIG_FILE, lambda c: c["frozen_encoders"]["text"]["args"].update(tiny_layers=10**6)),
    "categories_1e12": (CONFIG_FILE, lambda c: _item_tower_args(c).update(categorical_sizes=[9, 10**12])),
    "rerank_top_1e12": (CONFIG_FILE, lambda c: c.update(rerank_top=10**12)),
    "image_size_1e6": (CONFIG_FILE, lambda c: c.update(image_size=10**6)),
    "shard_rows_1e12": (emb.MANIFEST_FILE, lambda m: m["shards"]["items"][0].update(rows=10**12)),
    "manifest_dim_1e12": (emb.MANIFEST_FILE, lambda m: m.update(dim=10**12)),
}

MEASURE = """
import json, resource, sys, time
from multimodal_rec.serving.artifacts import ArtifactsError, load_artifacts
load_artifacts(sys.argv[1])  # imports and a clean load first: the peak memory a crafted load is compared with
results = {}
for folder in sys.argv[2:]:
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:
        load_artifacts(folder)
        error = None
    except ArtifactsError as refused:
        error = str(refused)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # MiB (ru_maxrss is in KiB)
    results[folder] = {"error": error, "seconds": time.perf_counter() - started, "grew_mib": grew}
print(json.dumps(results))
"""


def test_huge_declared_sizes_are_refused_before_anything_is_allocated(tiny_artifacts, tmp_path):
    """n_items = 10**12 or 12M (3 GB of item embeddings at 64-d) and other counts: refused in well under a second,
    and the process's peak memory does not move (measured in a fresh process: ru_maxrss only grows)."""
    folders = {}
    for name, (file, change) in SIZE_ATTACKS.items():
        folders[name] = _copy(tiny_artifacts, tmp_path / name)
        _edit_json(folders[name], file, change)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_artifacts), *map(str, folders.values())],
                          capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    for name, folder in folders.items():
        result = results[str(folder)]
        assert result["error"] is not None, name
        assert "\n" not in result["error"] and result["seconds"] < 5, (name, result)
        assert result["grew_mib"] < 100, (name, result)  # 12M x 64 floats alone would be 3 GB


def test_a_weight_shape_that_does_not_fit_the_spec_is_refused(tiny_artifacts, tmp_path):
    folder = _copy(tiny_artifacts, tmp_path)
    name = "item_tower.attributes.embeddings.1.weight"
    _edit_weights(folder, lambda tensors: tensors.update({name: tensors[name][:7].clone()}))
    message = _refused(folder, "does not fit item_tower")
    assert "attributes.embeddings.1.weight is (7, 64) there" in message


@pytest.mark.parametrize("value", [-5, 0, "64", 64.0, True, None])
@pytest.mark.parametrize("where", ["manifest", "model.json", "spec"])
def test_a_bad_dim_is_refused(tiny_artifacts, tmp_path, where, value):
    folder = _copy(tiny_artifacts, tmp_path)
    if where == "manifest":
        _edit_json(folder, emb.MANIFEST_FILE, lambda m: m.update(dim=value))
    elif where == "model.json":
        _edit_json(folder, CONFIG_FILE, lambda c: c.update(dim=value))
    else:
        _edit_json(folder, CONFIG_FILE, lambda c: _item_tower_args(c).update(dim=value))
    message = _refused(folder, "dim|item_tower")
    assert (emb.MANIFEST_FILE if where == "manifest" else CONFIG_FILE) in message


def _pickled(path: Path, marker: Path) -> None:
    np.save(path, np.array([WritesAFile(marker)], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("craft, match", [
    (_pickled, "Python objects"),
    (lambda path, _: np.save(path, np.zeros((200, 4, 32), np.float16)), r"expected \(200, 4, 64\) float16"),
    (lambda path, _: np.save(path, np.zeros((200, 4, 64), np.float64)), "float64, expected"),
    (lambda path, _: np.save(path, np.zeros(5, np.float16)), "expected"),
    (lambda path, _: path.write_bytes(path.read_bytes()[:-1000]), "declares"),  # the header promises more data
    (lambda path, _: path.write_bytes(b"\x93NUMPY garbage"), "not a .npy array"),
])
def test_a_crafted_modality_parts_file_is_refused(tiny_artifacts, tmp_path, craft, match):
    folder = _copy(tiny_artifacts, tmp_path)
    marker = tmp_path / "pwned"
    craft(folder / MODALITY_PARTS_FILE, marker)
    _rehash(folder)
    message = _refused(folder, match)
    assert MODALITY_PARTS_FILE in message and not marker.exists()


@pytest.mark.parametrize("name, depth", [(CONFIG_FILE, 100_000), (CONFIG_FILE, 40), (emb.MANIFEST_FILE, 100_000)])
def test_deeply_nested_json_is_refused(tiny_artifacts, tmp_path, name, depth):
    folder = _copy(tiny_artifacts, tmp_path)
    payload = json.loads((folder / name).read_text())
    text = json.dumps({**payload, "deep": "HOLE"}).replace('"HOLE"', "[" * depth + "]" * depth)
    (folder / name).write_text(text)
    if name != emb.MANIFEST_FILE:
        _rehash(folder)
    message = _refused(folder, "nest")
    assert name in message


def test_a_hub_model_name_is_refused_without_touching_the_network(tiny_artifacts, tmp_path, monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = _copy(tiny_artifacts, tmp_path)
    _edit_json(folder, CONFIG_FILE, lambda c: c["frozen_encoders"]["text"]["args"].update(
        model="sentence-transformers/foo"))
    assert "serving never downloads" in _refused(folder, "'sentence-transformers/foo'", seconds=5)
    _edit_json(folder, CONFIG_FILE, lambda c: c["frozen_encoders"]["text"]["args"].update(model="minilm"))
    _edit_json(folder, CONFIG_FILE, lambda c: c.update(text_tokenizer="sentence-transformers/foo"))
    assert "text_tokenizer" in _refused(folder, "'sentence-transformers/foo'", seconds=5)
    with pytest.raises(OSError):  # the class itself, rebuilt as serving does: the local cache only
        TextEncoder("sentence-transformers/foo", pretrained=False)
    assert attempts == []


def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), "red").save(path)
    return path


def _with_images(folder: Path, refs: list[str], image_root: str) -> None:
    catalog = pd.read_parquet(folder / CATALOG_FILE)
    catalog.loc[: len(refs) - 1, "image"] = refs
    catalog.loc[: len(refs) - 1, "has_image"] = True
    catalog.to_parquet(folder / CATALOG_FILE, index=False)
    _edit_json(folder, CONFIG_FILE, lambda c: c.update(image_root=image_root))


def test_image_root_in_model_json_cannot_lead_out_of_the_artifacts_tree(tiny_artifacts, tmp_path):
    """The rule (artifacts.image_folder): model.json's image_root counts only inside the artifact folder or the tree
    the artifacts root sits in; the operator's (serve.yaml) is used as it is; a ref never leaves its root."""
    folder = _copy(tiny_artifacts, tmp_path)
    inside = _png(folder / "pics" / "a.png")
    (folder / "pics" / "escape.png").symlink_to("/etc/passwd")
    refs = ["/etc/passwd", "etc/passwd", "a.png", "../../../../../../etc/passwd", "escape.png"]
    _with_images(folder, refs, "/")
    artifacts = load_artifacts(folder)
    assert artifacts.parts["image_root"] is None  # dropped: "/" lies outside
    item_ids = [int(i) for i in artifacts.item_ids[: len(refs)]]

    def served(root) -> list:  # as GET /items/{id}/image picks its root: serve.yaml's, else model.json's
        return [image_source(artifacts, i, 64, Path(root) if root else None) for i in item_ids]

    assert all(kind == "placeholder" for kind, _, _ in served(artifacts.parts["image_root"]))
    _with_images(folder, refs, "pics")  # relative: taken from the artifact folder
    artifacts = load_artifacts(folder)
    assert artifacts.parts["image_root"] == str(folder.resolve() / "pics")
    files = [source for kind, source, _ in served(artifacts.parts["image_root"]) if kind == "file"]
    assert files == [inside.resolve()]  # the symlink and the ../ lead out: placeholders
    operator = [(kind, source) for kind, source, _ in served("/etc")]  # serve.yaml's root is the operator's word
    assert operator[0] == ("file", Path("/etc/passwd")) and operator[1][0] == "placeholder"


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE, CATALOG_FILE, MODALITY_PARTS_FILE, USERS_FILE])
def test_serving_files_are_checked_against_the_manifest(tiny_artifacts, tmp_path, name):
    folder = _copy(tiny_artifacts, tmp_path)
    path = folder / name
    if name == CONFIG_FILE:  # still valid JSON of the same size: only the sha256 tells
        path.write_text(path.read_text().replace("\n ", "\n\t", 1))
        match = "does not match its sha256"
    elif path.exists():
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit: the size still matches, the sha256 does not
        path.write_bytes(bytes(data))
        match = "does not match its sha256"
    else:  # the tiny shop has no users.parquet: one slipped in is not one the export wrote
        pd.DataFrame({"user_id": [1], "source_id": ["u1"]}).to_parquet(path)
        match = "not recorded in manifest.json"
    message = _refused(folder, match)
    assert name in message and "python -m multimodal_rec.export ckpt_path=" in message


def test_an_export_without_checksums_is_refused_with_the_command_that_re_exports_it(tiny_artifacts, tmp_path):
    folder = _copy(tiny_artifacts, tmp_path)
    manifest = json.loads((folder / emb.MANIFEST_FILE).read_text())
    del manifest["files"]  # as written before the files were recorded
    (folder / emb.MANIFEST_FILE).write_text(json.dumps(manifest))
    message = _refused(folder, "records no checksums")
    assert f"python -m multimodal_rec.export ckpt_path=<run or checkpoint> out={folder}" in message


def _offsets_off_by_one(tensors: dict) -> None:
    tensors["histories.offsets"] = tensors["histories.offsets"][:-1].clone()


def _catalog(change):
    def craft(folder: Path) -> None:
        catalog = pd.read_parquet(folder / CATALOG_FILE)
        change(catalog).to_parquet(folder / CATALOG_FILE, index=False)
        _rehash(folder)
    return craft


def _index_manifest(change):
    def craft(folder: Path) -> None:
        from multimodal_rec.index import build_index

        build_index(folder, "flat", folder / "index-flat", recall_queries=10)
        manifest = json.loads((folder / "index-flat" / "manifest.json").read_text())
        change(folder / "index-flat", manifest)
        (folder / "index-flat" / "manifest.json").write_text(json.dumps(manifest))
    return craft


def _garbage_index(index: Path, manifest: dict) -> None:
    (index / "index.faiss").write_bytes(b"not a faiss index")
    manifest["files"]["index.faiss"]["sha256"] = emb.sha256_file(index / "index.faiss")


def _pickled_ids(index: Path, manifest: dict) -> None:
    _pickled(index / "ids.npy", index / "pwned")
    manifest["files"]["ids.npy"]["sha256"] = emb.sha256_file(index / "ids.npy")


def _garbage_shard(folder: Path) -> None:
    (folder / "items" / "part-00000.parquet").write_bytes(b"PAR1 not parquet PAR1")
    _edit_json(folder, emb.MANIFEST_FILE, lambda m: m["shards"]["items"][0].update(
        sha256=emb.sha256_file(folder / "items" / "part-00000.parquet")))


OTHER_ATTACKS = {  # name -> (craft the copy, what the one-line message names)
    "catalog_without_titles": (_catalog(lambda c: c.drop(columns="title")), "lacks the column 'title'"),
    "catalog_ids_as_text": (_catalog(lambda c: c.assign(item_id=c["item_id"].astype(str))), "column 'item_id'"),
    "catalog_short": (_catalog(lambda c: c.iloc[:-1]), "holds 199 rows, expected 200"),
    "histories": (lambda f: _edit_weights(f, _offsets_off_by_one), "histories"),
    "missing_tensor": (lambda f: _edit_weights(f, lambda t: t.pop("user_profiles.numeric")), "user_profiles.numeric"),
    "vocabularies_list": (lambda f: _edit_json(f, CONFIG_FILE, lambda c: c.update(vocabularies=[])), "vocabularies"),
    "modules_extra": (lambda f: _edit_json(f, CONFIG_FILE, lambda c: c["modules"].update(lock=None)), "modules"),
    "ranker_as_tower": (lambda f: _edit_json(f, CONFIG_FILE, lambda c: c["modules"].update(
        item_tower=c["modules"]["ranker"])), "item_tower must be a spec of ItemTower"),
    "heads_zero": (lambda f: _edit_json(f, CONFIG_FILE, lambda c: c["modules"]["history_encoder"]["args"].update(
        rnn="transformer", heads=0)), "history_encoder"),
    "shard_outside": (lambda f: _edit_json(f, emb.MANIFEST_FILE, lambda m: m["shards"]["items"][0].update(
        file="../../../etc/passwd")), "not a items shard"),
    "shards_list": (lambda f: _edit_json(f, emb.MANIFEST_FILE, lambda m: m.update(shards=[])), "shards"),
    "shard_not_parquet": (_garbage_shard, "part-00000.parquet cannot be read"),
    "index_nprobe": (_index_manifest(lambda index, m: m["params"].update(nprobe=10**12)), "nprobe"),
    "index_garbage": (_index_manifest(_garbage_index), "cannot be read by faiss"),
    "index_pickle": (_index_manifest(_pickled_ids), "Python objects"),
}


@pytest.mark.parametrize("attack", sorted(OTHER_ATTACKS))
def test_other_crafted_content_is_one_line_naming_the_file(tiny_artifacts, tmp_path, attack):
    """KeyError, TypeError, IndexError, pyarrow, faiss, safetensors errors from crafted content: never a 500."""
    folder = _copy(tiny_artifacts, tmp_path)
    craft, match = OTHER_ATTACKS[attack]
    craft(folder)
    _refused(folder, match)
    assert not (folder / "index-flat" / "pwned").exists()


def test_serve_py_exits_2_with_one_line_on_a_crafted_folder(tiny_artifacts, tmp_path):
    folder = _copy(tiny_artifacts, tmp_path)
    deep = json.dumps({"format": FORMAT, "deep": "HOLE"}).replace('"HOLE"', "[" * 100_000 + "]" * 100_000)
    (folder / CONFIG_FILE).write_text(deep)
    _rehash(folder)
    command = [sys.executable, str(PROJECT_ROOT / "serve.py"), f"artifacts={folder}", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and CONFIG_FILE in errors[0] and "Traceback" not in done.stderr
