"""Ways in: a live module, or a state dict plus the model's code, -> (traced module, ModelSpec).

`fcx train` builds its models from a config (fcexport.models); everything else enters here. The
result is what `fcexport.checkpoint.save_model` stores: after that, no step needs the user's code.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import fx, nn

from fcexport import graph
from fcexport.checkpoint import load_weights_file
from fcexport.data import known_class_names
from fcexport.errors import FcxError
from fcexport.files import sha256_file
from fcexport.models import Normalize
from fcexport.spec import ModelSpec, check_normalization, default_preprocess

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
NORMALIZE_NODE = "input_normalize"


def from_module(
    module: nn.Module,
    input_shape,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    architecture: dict | None = None,
) -> tuple[fx.GraphModule, ModelSpec]:
    """Trace an eval-mode copy of `module`, put (x - mean) / std in front of it, and describe it.

    The traced graph is checked against fcexport's allow-lists here, so a model that could not be
    stored fails now, naming the node, rather than at the first later step.
    """
    shape = parse_input_shape(input_shape)
    if not isinstance(module, nn.Module):
        raise FcxError(f"expected a torch.nn.Module, got {type(module).__name__}")
    gm = graph.trace(copy.deepcopy(module).eval())
    if sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
        raise FcxError("the model's forward() must take exactly one input tensor (N, C, H, W)")
    normalization = None
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise FcxError("normalisation needs both mean and std")
        means, stds = check_normalization(mean, std, shape[0])
        insert_normalize(gm, means, stds)
        normalization = {"mean": means, "std": stds}
    graph.to_data(gm)  # allow-list check, naming the first node that cannot be stored
    classes = _output_classes(gm, shape)
    names = [str(i) for i in range(classes)] if class_names is None else list(class_names)
    if len(names) != classes:
        raise FcxError(f"{len(names)} class names given but the model returns {classes} logits per image")
    spec = ModelSpec(
        input_shape=shape,
        class_names=names,
        preprocess=default_preprocess(shape[0]),
        normalization=normalization,
        architecture=architecture or {"kind": "imported", "module": f"{type(module).__module__}.{type(module).__qualname__}"},
    )
    return gm, spec


def from_state_dict(
    weights: str | Path,
    model_def: str,
    input_shape,
    model_args: dict | None = None,
    key: str | None = None,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
) -> tuple[fx.GraphModule, ModelSpec]:
    """Build the user's model from its code, load the weights strictly, then as `from_module`."""
    weights = Path(weights)
    state_dict = find_state_dict(load_weights_file(weights), weights, key)
    module = build_user_model(model_def, model_args or {})
    state_dict = _strip_prefix(state_dict, module)
    graph.check_weights(module, state_dict, str(weights))
    module.load_state_dict(state_dict, strict=True)
    architecture = {
        "kind": "imported",
        "model_def": model_def,
        "model_args": model_args or {},
        "weights": weights.name,
        "weights_sha256": sha256_file(weights),
    }
    return from_module(module, input_shape, class_names, mean, std, architecture)


# ---- pieces ------------------------------------------------------------------------------


def parse_input_shape(value) -> list[int]:
    """"C,H,W" or a sequence of three positive ints."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    try:
        shape = [int(v) for v in items] if items is not None else None
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) != 3 or min(shape) < 1:
        raise FcxError(f"input shape must be three positive integers C,H,W (e.g. 1,28,28 or 3,224,224), got {value!r}")
    ModelSpec(input_shape=shape, class_names=["0"])  # size limits
    return shape


def parse_class_names(text: str | None) -> list[str] | None:
    """A known set (fashion-mnist, mnist, kmnist, digits), a text file with one name per line, or a comma list."""
    if text is None:
        return None
    known = known_class_names(text)
    if known is not None:
        return known
    path = Path(text)
    if path.suffix.lower() in (".txt", ".names", ".csv") and not path.is_file():
        raise FcxError(f"{path}: class names file not found")
    if path.is_file():
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise FcxError(f"{path}: cannot read class names ({type(exc).__name__}); one UTF-8 name per line") from exc
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise FcxError(f"no class names in {text!r}")
    return names


def find_state_dict(loaded, path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict itself, or the one a training checkpoint nests under `key` (or a usual key)."""
    if not isinstance(loaded, dict):
        raise FcxError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    if key is not None:
        if not isinstance(loaded.get(key), dict):
            raise FcxError(f"{path}: has no state dict under key {key!r} (keys: {', '.join(map(str, list(loaded)[:8]))})")
        loaded = loaded[key]
    elif not _is_state_dict(loaded):
        nested = [k for k in NESTED_KEYS if _is_state_dict(loaded.get(k))]
        if not nested:
            raise FcxError(f"{path}: no state dict found (keys: {', '.join(map(str, list(loaded)[:8]))}); name the key that holds it")
        loaded = loaded[nested[0]]
    if not _is_state_dict(loaded):
        raise FcxError(f"{path}: the state dict holds values that are not tensors")
    return loaded


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _strip_prefix(state_dict: dict, module: nn.Module) -> dict:
    """Weights saved from nn.DataParallel / DistributedDataParallel carry a `module.` prefix."""
    own = module.state_dict()
    if all(k.startswith("module.") for k in state_dict) and not any(k.startswith("module.") for k in own):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def build_user_model(model_def: str, model_args: dict) -> nn.Module:
    """Import NAME from `path/to/file.py:NAME` or `package.module:NAME` and call it with `model_args`.

    This runs the user's own model code (their file or an installed package), once, at import time.
    """
    if not isinstance(model_def, str) or ":" not in model_def:
        raise FcxError(f"model definition must be FILE.py:NAME or package.module:NAME, got {model_def!r}")
    location, name = model_def.rsplit(":", 1)
    if not isinstance(model_args, dict):
        raise FcxError(f"model arguments must be a JSON object of keyword arguments, got {json.dumps(model_args)}")
    namespace = _import_location(location)
    factory = getattr(namespace, name, None)
    if factory is None or not callable(factory):
        raise FcxError(f"{location}: defines no class or function named {name!r}")
    try:
        module = factory(**model_args)
    except (Exception, SystemExit) as exc:  # the user's code may call sys.exit; that is its error, not ours
        raise FcxError(f"{model_def}({', '.join(f'{k}={v!r}' for k, v in model_args.items())}) failed: "
                       f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise FcxError(f"{model_def} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _import_location(location: str):
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise FcxError(f"{path}: model file not found")
        module_name = f"fcexport_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        namespace = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = namespace  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(namespace)
        except (Exception, SystemExit) as exc:
            raise FcxError(f"{path}: running the model file failed: {type(exc).__name__}: {exc}") from exc
        return namespace
    try:
        return importlib.import_module(location)
    except Exception as exc:
        raise FcxError(f"cannot import {location!r} ({type(exc).__name__}: {exc})") from exc


def insert_normalize(gm: fx.GraphModule, mean: list[float], std: list[float]) -> None:
    """Put a Normalize layer between the input and the rest of the graph."""
    name = NORMALIZE_NODE
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, Normalize(mean, std))
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(placeholder):
        node = gm.graph.call_module(name, (placeholder,))
    placeholder.replace_all_uses_with(node)
    node.args = (placeholder,)
    gm.recompile()


def _output_classes(gm: fx.GraphModule, shape: list[int]) -> int:
    """Run two zero images through the model: it must return logits of shape (2, classes)."""
    try:
        with torch.inference_mode():
            out = gm(torch.zeros(2, *shape))
    except Exception as exc:
        raise FcxError(f"the model does not run on input of shape (N, {', '.join(map(str, shape))}) "
                       f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                       "check the input shape") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FcxError(f"the model must return logits of shape (N, classes); it returned {got}")
    return int(out.shape[1])
