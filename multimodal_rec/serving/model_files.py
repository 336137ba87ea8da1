"""The serving parts on disk without pickles: `model.json` (settings, vocabularies, module specs) and
`model.safetensors` (every tensor: module weights, histories, numeric quantiles, content-graph units).

Loading builds the modules from their specs (this package's rebuildable classes only, safe_modules.py)
and fills them from the safetensors file, which holds tensors only: a file a server loads cannot run
code. An older folder with a pickled `model.pt` is refused with the command that re-exports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from multimodal_rec.data.features import UserFeatures
from multimodal_rec.embeddings import EmbeddingsError, atomic_file
from multimodal_rec.models.item_inputs import UserInputs
from multimodal_rec.safe_modules import SpecError, build_module, module_spec

FORMAT = "multimodal_rec.serving/2"
CONFIG_FILE, WEIGHTS_FILE, LEGACY_FILE = "model.json", "model.safetensors", "model.pt"
MODULES = ("item_tower", "history_encoder", "ranker", "item_bias")
TENSOR_PARTS = (*MODULES, "frozen_encoders", "user_profiles", "histories", "vocabularies", "content_graph")
REEXPORT = "re-export it: python -m multimodal_rec.export ckpt_path=<run or checkpoint> out=<folder>"


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


def _take_module(spec: dict, prefix: str, tensors: dict) -> torch.nn.Module:
    module = build_module(spec)
    state = {name[len(prefix) + 1:]: value for name, value in tensors.items() if name.startswith(prefix + ".")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactsError(f"{WEIGHTS_FILE} does not fit {prefix} ({spec['_target_']}): missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return module.eval()


def read_config(root: Path) -> dict:
    path = root / CONFIG_FILE
    if not path.is_file():
        if (root / LEGACY_FILE).exists():
            raise ArtifactsError(f"{root} holds {LEGACY_FILE}, the pickled format of older versions, which is no "
                                 f"longer loaded (a pickle can run code when it is read); {REEXPORT}")
        raise ArtifactsError(f"{root} lacks {CONFIG_FILE}: export with serving_parts=true")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactsError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ArtifactsError(f"{path} is format {found!r}, this version serves {FORMAT!r}; {REEXPORT}")
    return config


def load_parts(root: Path, config: dict) -> dict:
    """The serving parts as write_serving_parts gathered them (config: `read_config(root)`): modules rebuilt,
    tables as numpy arrays."""
    path = root / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactsError(f"{root} lacks {WEIGHTS_FILE}; {REEXPORT}")
    data = path.read_bytes()  # once: hashed, then parsed
    if hashlib.sha256(data).hexdigest() != config.get("weights_sha256"):
        raise ArtifactsError(f"{path} is not the file {CONFIG_FILE} was written with (sha256 differs); {REEXPORT}")
    try:
        tensors = load(data)
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
    return parts
