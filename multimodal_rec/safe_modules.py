"""Modules saved as data, never as pickled code: a JSON spec of the constructor call + a safetensors state.

A class marked `@rebuildable` records the arguments it was built with. `module_spec` turns a module into
{"_target_": "<the project's class>", "args": {...}} (nested modules as specs too), and `build_module`
builds it back, but only for classes of this package that were marked rebuildable: a spec cannot name
`os.system` or any other callable. The weights then come from a safetensors file, which holds tensors only.
As Hugging Face's config.json + model.safetensors.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

from torch import nn

PACKAGE = "multimodal_rec."
_REBUILDABLE: dict[str, type] = {}
# arguments that fetch weights at construction: off when rebuilding, the weights come from the saved state
_WEIGHT_SOURCES = {"pretrained": False, "weights": None}


class SpecError(ValueError):
    """A module spec that cannot be built: unknown or foreign class, bad arguments."""


def rebuildable(cls: type) -> type:
    """Class decorator: instances remember their constructor arguments (in `_rebuild_args`)."""
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        recorded = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            else:
                recorded[name] = value
        self._rebuild_args = recorded

    cls.__init__ = __init__
    _REBUILDABLE[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _plain(value, where: str):
    """A constructor argument as JSON data (OmegaConf containers and tuples become lists/dicts)."""
    if isinstance(value, nn.Module):
        return module_spec(value)
    if hasattr(value, "_metadata") and hasattr(value, "_content"):  # an OmegaConf container
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise SpecError(f"{where} = {value!r} ({type(value).__name__}) cannot be saved as data")


def module_spec(module: nn.Module) -> dict:
    """{"_target_": class path, "args": constructor arguments} of a module built by a rebuildable class."""
    target = f"{type(module).__module__}.{type(module).__qualname__}"
    if target not in _REBUILDABLE or not hasattr(module, "_rebuild_args"):
        raise SpecError(f"{target} is not marked @rebuildable, so it cannot be saved without pickling")
    return {"_target_": target, "args": {name: _plain(value, f"{target}({name})")
                                         for name, value in module._rebuild_args.items()}}


def _is_spec(value) -> bool:
    return isinstance(value, dict) and set(value) == {"_target_", "args"}


def _built(value):
    if _is_spec(value):
        return build_module(value)
    if isinstance(value, list):
        return [_built(v) for v in value]
    if isinstance(value, dict):
        return {k: _built(v) for k, v in value.items()}
    return value


def build_module(spec: dict) -> nn.Module:
    """The module a spec describes, randomly initialised (load its state next). Only this package's
    rebuildable classes; the module that defines one is imported if it was not yet."""
    if not _is_spec(spec) or not isinstance(spec["_target_"], str) or not isinstance(spec["args"], dict):
        raise SpecError(f"not a module spec: {str(spec)[:200]}")
    target = spec["_target_"]
    if not target.startswith(PACKAGE):
        raise SpecError(f"{target!r} is not a class of {PACKAGE[:-1]}; refusing to build it")
    if target not in _REBUILDABLE:
        module_name = target.rsplit(".", 1)[0]
        try:
            importlib.import_module(module_name)
        except ImportError as error:
            raise SpecError(f"{target!r}: module {module_name} cannot be imported ({error})") from error
    cls = _REBUILDABLE.get(target)
    if cls is None:
        raise SpecError(f"{target!r} is not a rebuildable module class of {PACKAGE[:-1]}")
    args = {name: _built(value) for name, value in spec["args"].items()}
    args.update({name: off for name, off in _WEIGHT_SOURCES.items() if name in args})
    try:
        return cls(**args)
    except (TypeError, ValueError, KeyError) as error:
        raise SpecError(f"{target} cannot be built from {sorted(args)}: {error}") from error
