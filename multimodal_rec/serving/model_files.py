"""The serving parts on disk without pickles: `model.json` (settings, vocabularies, module specs) and
`model.safetensors` (every tensor: module weights, histories, numeric quantiles, content-graph units).

Loading builds the modules from their specs (this package's rebuildable classes only, safe_modules.py)
and fills them from the safetensors file, which holds tensors only: a file a server loads cannot run
code. An older folder with a pickled `model.pt` is refused with the command that re-exports it.
Whoever can write the folder can craft model.json: every setting is type- and range-checked, every size
a spec declares is compared with the tensors in the file before the module is built for real, and text
models must be offline ones (serving never downloads).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from multimodal_rec.data.features import UserFeatures
from multimodal_rec.embeddings import MAX_DIM, MAX_ROWS, EmbeddingsError, atomic_file, checked_int
from multimodal_rec.models.components.item_tower import MODALITIES
from multimodal_rec.models.item_inputs import UserInputs
from multimodal_rec.safe_modules import PACKAGE, SpecError, build_module, module_spec

FORMAT = "multimodal_rec.serving/2"
CONFIG_FILE, WEIGHTS_FILE, LEGACY_FILE = "model.json", "model.safetensors", "model.pt"
MODULES = ("item_tower", "history_encoder", "ranker", "item_bias")
TENSOR_PARTS = (*MODULES, "frozen_encoders", "user_profiles", "histories", "vocabularies", "content_graph")
REEXPORT = "re-export it: python -m multimodal_rec.export ckpt_path=<run or checkpoint> out=<folder>"
_COMPONENTS = "multimodal_rec.models.components"
TARGETS = {  # the class each slot of model.json must name
    "item_tower": f"{_COMPONENTS}.item_tower.ItemTower",
    "history_encoder": f"{_COMPONENTS}.history_encoder.HistoryEncoder",
    "ranker": f"{_COMPONENTS}.ranker.Ranker", "item_bias": f"{_COMPONENTS}.item_bias.ItemBias",
    "frozen_encoders.image": f"{_COMPONENTS}.image_encoder.ImageEncoder",
    "frozen_encoders.text": f"{_COMPONENTS}.text_encoder.TextEncoder",
}
OFFLINE_MODELS = ("minilm",)  # text models shipped as packages (data/features.py); others: local folders only
MAX_JSON_DEPTH = 32  # the export writes under 10 levels
MAX_IMAGE_SIZE, MAX_TEXT_LEN, MAX_RERANK, MAX_HISTORY = 4096, 8192, 100_000, 1_000_000
EXTRA_VALUES = 1 << 20  # values a module may hold beyond its saved state (non-persistent buffers: image mean/std)


class ArtifactsError(EmbeddingsError):
    """An artifact folder that cannot be served; the message says which file and why."""


def _json_default(value):
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "shape", None) in ((), torch.Size([])):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON data")


def _put_module(module: torch.nn.Module, prefix: str, tensors: dict) -> dict:
    for name, value in module.state_dict().items():
        tensors[f"{prefix}.{name}"] = value
    return module_spec(module)


def save_parts(parts: dict, out: Path) -> None:
    """parts: what write_serving_parts gathered (modules, numpy arrays, plain settings)."""
    tensors: dict[str, torch.Tensor] = {}
    config = {k: v for k, v in parts.items() if k not in TENSOR_PARTS}
    config["format"] = FORMAT
    config["modules"] = {name: None if parts[name] is None else _put_module(parts[name], name, tensors)
                         for name in MODULES}
    config["frozen_encoders"] = {kind: _put_module(encoder, f"frozen_encoders.{kind}", tensors)
                                 for kind, encoder in parts["frozen_encoders"].items()}
    tensors["user_profiles.categorical"] = parts["user_profiles"].categorical
    tensors["user_profiles.numeric"] = parts["user_profiles"].numeric
    for key, value in parts["histories"].items():
        tensors[f"histories.{key}"] = torch.tensor(np.asarray(value))
    vocab = dict(parts["vocabularies"])
    for kind in ("numeric", "user_numeric"):  # sorted reference values of each numeric column, in order
        for column, values in vocab[kind].items():
            tensors[f"vocabularies.{kind}.{column}"] = torch.from_numpy(np.asarray(values, dtype=np.float64))
        vocab[kind] = list(vocab[kind])
    config["vocabularies"] = vocab
    graph = parts["content_graph"]
    if graph is not None:
        tensors["content_graph.pool"] = graph["pool"]
        tensors.update({f"content_graph.units.{i}": unit for i, unit in enumerate(graph["units"])})
        graph = {"k": graph["k"], "kinds": list(graph["kinds"]), "units": len(graph["units"])}
    config["content_graph"] = graph
    # clones: safetensors refuses tensors that share memory (views, tied weights)
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in tensors.items()}
    data = save(tensors, metadata={"format": FORMAT})  # bytes: hashed here, not read back from disk
    with atomic_file(out / WEIGHTS_FILE) as tmp:
        Path(tmp).write_bytes(data)
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    with atomic_file(out / CONFIG_FILE) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=1, default=_json_default))


def _specs_in(spec) -> list[dict]:
    """Every module spec (a dict with a `_target_`) in `spec`, nested ones included (iteratively: no recursion)."""
    found, stack = [], [spec]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "_target_" in value:
                found.append(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def is_offline_model(name) -> bool:
    """A text model or tokenizer serving can load without the network: one shipped as a package, or a local folder
    (a hub id such as "sentence-transformers/x" would be downloaded)."""
    return isinstance(name, str) and (name in OFFLINE_MODELS or (name.strip() != "" and Path(name).is_dir()))


def _check_specs(path: Path, config: dict) -> None:
    """Each slot names its own class of this package, and text models are offline ones: checked on the JSON,
    before anything is built or fetched."""
    modules, frozen = config.get("modules"), config.get("frozen_encoders")
    if not (isinstance(modules, dict) and set(modules) == set(MODULES) and isinstance(frozen, dict)
            and set(frozen) <= {"image", "text"}):
        raise ArtifactsError(f"{path}: `modules` must name {', '.join(MODULES)} and `frozen_encoders` only image "
                             f"and text; {REEXPORT}")
    slots = {**modules, **{f"frozen_encoders.{kind}": spec for kind, spec in frozen.items()}}
    for slot, spec in slots.items():
        if spec is None and slot in ("ranker", "item_bias"):
            continue
        for inner in _specs_in(spec):
            target = inner["_target_"]
            if not isinstance(target, str) or not target.startswith(PACKAGE):
                raise ArtifactsError(f"{path}: {str(target)[:100]!r} is not a class of {PACKAGE[:-1]}; refusing to "
                                     "build it")
            model = inner.get("args", {}).get("model", "minilm") if isinstance(inner.get("args"), dict) else None
            if target == TARGETS["frozen_encoders.text"] and not is_offline_model(model):
                raise ArtifactsError(f"{path}: text model {str(model)[:100]!r} is neither {OFFLINE_MODELS[0]!r} nor "
                                     "a local folder, and serving never downloads models; export with one of those")
        if not isinstance(spec, dict) or spec.get("_target_") != TARGETS[slot]:
            raise ArtifactsError(f"{path}: {slot} must be a spec of {TARGETS[slot].rsplit('.', 1)[1]}; {REEXPORT}")


def _check_settings(path: Path, config: dict) -> None:
    """Types and ranges of the settings serving sizes things by (dim = -5, 10**12 items, "64" are refused)."""
    def number(key: str, low: int, high: int, default=None) -> int:
        return checked_int(config.get(key, default), f"{path}: {key}", low, high, ArtifactsError)

    dim = number("dim", 1, MAX_DIM)
    number("item_dim", 1, dim, dim)
    number("n_items", 0, MAX_ROWS)
    number("max_len", 1, MAX_HISTORY)
    number("rerank_top", 0, MAX_RERANK)
    number("image_size", 1, MAX_IMAGE_SIZE)
    number("max_text_len", 1, MAX_TEXT_LEN)
    offset = config.get("cold_offset", 0.0)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ArtifactsError(f"{path}: cold_offset must be a finite number, got {str(offset)[:50]!r}")
    if config.get("score", "cosine") not in ("cosine", "dot"):
        raise ArtifactsError(f"{path}: score must be cosine or dot, got {str(config.get('score'))[:50]!r}")
    for key, known in (("modalities", MODALITIES), ("part_names", (*MODALITIES, "neighbours"))):
        names = config.get(key, [])
        if not isinstance(names, list) or not set(map(str, names)) <= set(known) or len(names) > len(known):
            raise ArtifactsError(f"{path}: {key} must be a list of {', '.join(known)}")
    tokenizer = config.get("text_tokenizer", "minilm")
    if tokenizer != "hash" and not is_offline_model(tokenizer):
        raise ArtifactsError(f"{path}: text_tokenizer {str(tokenizer)[:100]!r} is not 'hash', "
                             f"{OFFLINE_MODELS[0]!r} or a local folder, and serving never downloads one")
    if not isinstance(config.get("image_root"), (str, type(None))):
        raise ArtifactsError(f"{path}: image_root must be a folder name or null")
    vocab = config.get("vocabularies")
    shapes = {"categorical": dict, "multi_columns": list, "multi": list, "numeric": list, "user_categorical": dict,
              "user_numeric": list}
    if not isinstance(vocab, dict) or any(not isinstance(vocab.get(k), t) for k, t in shapes.items()) or any(
            not isinstance(v, list) for k in ("categorical", "user_categorical") for v in vocab[k].values()):
        raise ArtifactsError(f"{path}: vocabularies must hold {', '.join(shapes)} as the export writes them")
    graph = config.get("content_graph")
    if graph is not None:
        if not isinstance(graph, dict) or not isinstance(graph.get("kinds"), list) or not set(
                map(str, graph["kinds"])) <= {"image", "text"}:
            raise ArtifactsError(f"{path}: content_graph must be null or {{k, kinds, units}}")
        checked_int(graph.get("k"), f"{path}: content_graph.k", 1, MAX_RERANK, ArtifactsError)
        checked_int(graph.get("units"), f"{path}: content_graph.units", 0, 16, ArtifactsError)


def _check_args(spec: dict, prefix: str, state: dict) -> None:
    """Counts and sizes a spec declares, against what the file holds for the module, before it is built at all
    (even shapes-only, a spec declaring 10**9 layers would take forever to build)."""
    tensors, values = len(state), sum(value.numel() for value in state.values())
    stack = [(name, value) for inner in _specs_in(spec) if isinstance(inner.get("args"), dict)
             for name, value in inner["args"].items()]
    while stack:
        name, value = stack.pop()
        if isinstance(value, list):
            if len(value) > max(tensors, 16):
                raise ArtifactsError(f"{CONFIG_FILE}: {prefix} declares {len(value)} {name}, more than "
                                     f"{WEIGHTS_FILE} holds tensors for")
            stack.extend((name, item) for item in value)
        elif isinstance(value, int) and not isinstance(value, bool):
            limit = tensors if name.endswith("layers") else values  # a layer holds tensors; a size, values
            if value > limit:
                raise ArtifactsError(f"{CONFIG_FILE}: {prefix} declares {name}={value}, more than the {limit} "
                                     f"{'tensors' if name.endswith('layers') else 'values'} {WEIGHTS_FILE} holds")


def _take_module(spec: dict, prefix: str, tensors: dict) -> torch.nn.Module:
    """The module built from its spec and filled from the file, once the spec is known to fit the file: sizes are
    compared on a shapes-only (meta) build, so a crafted size allocates nothing."""
    state = {name[len(prefix) + 1:]: value for name, value in tensors.items() if name.startswith(prefix + ".")}
    _check_args(spec, prefix, state)
    try:
        with torch.device("meta"):
            shell = build_module(spec)
    except (RuntimeError, ArithmeticError, IndexError) as error:  # dim = -5, heads = 0, ...: not buildable
        raise ArtifactsError(f"{CONFIG_FILE}: {prefix} cannot be built from its spec ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:200]})") from error
    expected = shell.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactsError(f"{WEIGHTS_FILE} does not fit {prefix} ({spec['_target_']}): missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    for name, value in expected.items():
        if tuple(value.shape) != tuple(state[name].shape):
            raise ArtifactsError(f"{WEIGHTS_FILE} does not fit {prefix}: {name} is {tuple(state[name].shape)} there "
                                 f"but {tuple(value.shape)} for the module {CONFIG_FILE} describes")
    held = sum(t.numel() for t in (*shell.parameters(), *shell.buffers()))
    if held > sum(value.numel() for value in state.values()) + EXTRA_VALUES:
        raise ArtifactsError(f"{CONFIG_FILE} builds {prefix} with {held} values, far more than {WEIGHTS_FILE} holds")
    module = build_module(spec)
    module.load_state_dict(state, strict=True)
    return module.eval()


def read_config(root: Path) -> dict:
    """model.json, refused unless it is this format, with module specs naming this package's classes and offline
    text models, and settings of the right types and ranges (checked before its sha256, so that the message says
    what is wrong with it)."""
    path = root / CONFIG_FILE
    if not path.is_file():
        if (root / LEGACY_FILE).exists():
            raise ArtifactsError(f"{root} holds {LEGACY_FILE}, the pickled format of older versions, which is no "
                                 f"longer loaded (a pickle can run code when it is read); {REEXPORT}")
        raise ArtifactsError(f"{root} lacks {CONFIG_FILE}: export with serving_parts=true")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:  # not JSON, not UTF-8, an integer of thousands of digits
        raise ArtifactsError(f"{path} is not valid JSON ({error})") from error
    except RecursionError as error:
        raise ArtifactsError(f"{path} is nested too deeply to be one the export wrote; {REEXPORT}") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = str(config.get("format"))[:80] if isinstance(config, dict) else None
        raise ArtifactsError(f"{path} is format {found!r}, this version serves {FORMAT!r}; {REEXPORT}")
    if _depth(config) > MAX_JSON_DEPTH:
        raise ArtifactsError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels, which the export never writes")
    _check_specs(path, config)
    _check_settings(path, config)
    return config


def load_parts(root: Path, config: dict) -> dict:
    """The serving parts as write_serving_parts gathered them (config: `read_config(root)`): modules rebuilt,
    tables as numpy arrays; every size checked against model.safetensors before anything of that size exists."""
    path = root / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactsError(f"{root} lacks {WEIGHTS_FILE}; {REEXPORT}")
    data = path.read_bytes()  # once: hashed, then parsed
    if hashlib.sha256(data).hexdigest() != config.get("weights_sha256"):
        raise ArtifactsError(f"{path} is not the file {CONFIG_FILE} was written with (sha256 differs); {REEXPORT}")
    try:
        tensors = load(data)  # no more memory than the file: safetensors checks shapes against its bytes
    except SafetensorError as error:
        raise ArtifactsError(f"{path} cannot be read ({error})") from error
    try:
        parts = {k: v for k, v in config.items() if k not in ("modules", "weights_sha256")}
        parts.update({name: None if spec is None else _take_module(spec, name, tensors)
                      for name, spec in config["modules"].items()})
        parts["frozen_encoders"] = {kind: _take_module(spec, f"frozen_encoders.{kind}", tensors)
                                    for kind, spec in config["frozen_encoders"].items()}
        parts["user_profiles"] = UserInputs(UserFeatures(tensors["user_profiles.categorical"], [],
                                                         tensors["user_profiles.numeric"]))
        parts["histories"] = {key[len("histories."):]: value.numpy() for key, value in tensors.items()
                              if key.startswith("histories.")}
        vocab = dict(config["vocabularies"])
        for kind in ("numeric", "user_numeric"):
            vocab[kind] = {column: tensors[f"vocabularies.{kind}.{column}"].numpy() for column in vocab[kind]}
        parts["vocabularies"] = vocab
        graph = config["content_graph"]
        if graph is not None:
            parts["content_graph"] = {"k": graph["k"], "kinds": graph["kinds"], "pool": tensors["content_graph.pool"],
                                      "units": [tensors[f"content_graph.units.{i}"] for i in range(graph["units"])]}
    except (KeyError, TypeError, SpecError) as error:
        raise ArtifactsError(f"{root}: {CONFIG_FILE} and {WEIGHTS_FILE} do not describe serving parts "
                             f"({type(error).__name__}: {error}); {REEXPORT}") from error
    _check_parts(root, parts)
    return parts


def _check_parts(root: Path, parts: dict) -> None:
    """What requests index by agrees with itself: the tower's ids and widths, the histories' offsets, a profile
    row per user (a mismatch would fail requests later, not here)."""
    where = f"{root / WEIGHTS_FILE}:"
    tower, encoder = parts["item_tower"], parts["history_encoder"]
    if tower.dim != parts.get("item_dim", parts["dim"]) or list(tower.part_names) != parts.get(
            "part_names", list(tower.part_names)) or list(tower.modalities) != parts["modalities"]:
        raise ArtifactsError(f"{where} the item tower is not the one {CONFIG_FILE} describes (width, modalities)")
    if "id" in tower.modalities and tower.id_embedding.num_embeddings != parts["n_items"] + 1:
        raise ArtifactsError(f"{where} the item tower holds {tower.id_embedding.num_embeddings - 1} item ids, "
                             f"{CONFIG_FILE} says n_items = {parts['n_items']}")
    if hasattr(encoder, "attention") and encoder.attention.max_len < parts["max_len"]:
        raise ArtifactsError(f"{where} the history encoder reads {encoder.attention.max_len} items, max_len says "
                             f"{parts['max_len']}")
    histories = parts["histories"]
    if set(histories) != {"user_ids", "offsets", "items", "last_hour"} or any(
            v.ndim != 1 or v.dtype.kind not in "iu" for v in histories.values()):
        raise ArtifactsError(f"{where} histories must be user_ids, offsets, items, last_hour (1-d integers)")
    users, offsets = len(histories["user_ids"]), histories["offsets"]
    if (len(offsets) != users + 1 or offsets[0] != 0 or offsets[-1] != len(histories["items"])
            or np.any(np.diff(offsets) < 0) or len(histories["last_hour"]) != users
            or np.any((histories["last_hour"] < 0) | (histories["last_hour"] > 23))):
        raise ArtifactsError(f"{where} the histories' offsets, items and hours do not agree for {users} users")
    profiles = parts["user_profiles"]
    if profiles.categorical.ndim != 2 or profiles.numeric.ndim != 2 or len(profiles.categorical) != users or len(
            profiles.numeric) != users or profiles.categorical.dtype != torch.int64:
        raise ArtifactsError(f"{where} the user profiles are not one (codes, numbers) row per user")
