"""Ways in: a live module, or a state dict plus the model's code, -> (Program, ModelSpec).

`fcx train` builds its models from a config (fcexport.models) and stores them through the same capture. The
module is exported with torch.export and kept as a Program (fcexport.program): after that, no step needs the
user's code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from fcexport.checkpoint import load_weights_file
from fcexport.data import KNOWN_CLASS_SETS, known_class_names
from fcexport.errors import HINTS, FcxError
from fcexport.program import (Program, all_finite, capture_outputs, check_shapes, input_misfit, other_outputs, output_shape,
                              returns_probabilities, task_of, with_input_normalization)
from fcexport.spec import RESAMPLING, Architecture, ModelSpec, Normalization, Preprocess, check_normalization, check_resize, default_preprocess

# where training scripts nest the weights, in order of preference (an EMA copy only when there is nothing else)
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "state_dict_ema", "model_ema", "ema")


def from_module(
    module: nn.Module,
    input_shape,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    architecture: dict | None = None,
    on_step=None,
    preprocess: Preprocess | None = None,
    output: str | None = None,
) -> tuple[Program, ModelSpec]:
    """Export an eval-mode copy of `module`, put (x - mean) / std in front of it, and describe it (`on_step` hears
    each step); images are prepared as `preprocess` says, else as `spec.default_preprocess`. Of several outputs (a
    dict, a tuple, a ModelOutput), `output` names the one kept (default: "out", "logits", else the first).

    Everything a later step needs is checked here (the opset, argument types, shapes on the meta device),
    so a model that could not be stored fails now, naming the layer, rather than at a later step."""
    shape = parse_input_shape(input_shape)
    if not isinstance(module, nn.Module):
        raise FcxError(f"expected a torch.nn.Module, got {type(module).__name__}")
    module = _unwrapped(module)
    try:
        normalization = _normalization(mean, std, shape[0])
    except FcxError:
        if misfit := input_misfit(module, shape):  # a channels-last shape: the fix is the shape's, not the mean's
            raise FcxError(misfit) from None
        raise
    _step(on_step, "exporting with torch.export and lowering to core ATen")
    try:
        with _in_eval_mode(module):
            program, kept = capture_outputs(module, shape, output)
    except FcxError as exc:
        if wrong := _weights_dtype(module):  # the likely cause of whatever failed: said instead
            raise FcxError(wrong) from exc
        raise
    except SystemExit as exc:  # the user's forward() may call sys.exit; that is its error, not fcx's exit
        where = (architecture or {}).get("model_def", "the model")
        raise FcxError(f"{where}: the model's code called sys.exit({exc.code!r}) while it was exported") from exc
    if normalization:
        program = with_input_normalization(program, normalization["mean"], normalization["std"])
    _step(on_step, "checking every op and size")
    shapes = check_shapes(program, shape, "the model")
    out = output_shape(program, shapes, "the model")
    names = [str(i) for i in range(out[0])] if class_names is None else _names_list(class_names)
    if len(names) != out[0]:
        raise FcxError(f"{len(names)} class names given but the model returns {out[0]} logits per {'pixel' if len(out) > 1 else 'image'}")
    spec = ModelSpec(
        input_shape=shape,
        class_names=names,
        preprocess=preprocess or default_preprocess(shape[0], dense=len(out) > 1),
        normalization=Normalization(normalization["mean"], normalization["std"]) if normalization else None,
        architecture=Architecture("imported", (architecture or {"module": f"{type(module).__module__}.{type(module).__qualname__}"})
                                  | kept),
        task=task_of(out),
        output_shape=out,
        other_outputs=other_outputs(program, shapes, "the model"),
        probabilities=returns_probabilities(program, out),
        peak_bytes=shapes.peak,
    )
    return program, spec


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model inside the wrappers users hand over: torch.compile's OptimizedModule, nn.DataParallel and
    DistributedDataParallel (their forward takes *args, which torch.export's batch dimension cannot be given for)."""
    from torch._dynamo.eval_frame import OptimizedModule

    for _ in range(8):  # wrappers in wrappers, a few deep; never a loop
        if isinstance(module, OptimizedModule):
            inner = module._orig_mod
        elif type(module).forward in (nn.DataParallel.forward, nn.parallel.DistributedDataParallel.forward):
            inner = module.module  # a subclass with a forward of its own is a model, not a wrapper
        else:
            return module
        if not isinstance(inner, nn.Module) or inner is module:
            return module
        module = inner
    return module


def _weights_dtype(module: nn.Module) -> str | None:
    """When the model's floating weights are not float32 (model.half()): that, in words with the fix; else None."""
    found = {t.dtype for t in module.parameters() if t.is_floating_point()} - {torch.float32}
    if not found:
        return None
    kinds = ", ".join(sorted(str(d).removeprefix("torch.") for d in found))
    return (f"the model's weights are {kinds}: fcexport imports float32 models (its reference is float64, its files "
            "float32, int8 by export); import model.float() (float16 and bfloat16 weights become float32 exactly)")


@contextlib.contextmanager
def _in_eval_mode(module: nn.Module):
    """The module itself in eval mode while it is captured, each submodule's own mode restored after. Not a copy: a
    copy doubles the memory, and deepcopy refuses the computed weights of pruned (torch.nn.utils.prune) and legacy
    weight-normed models."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _normalization(mean, std, channels: int) -> dict | None:
    """{"mean", "std"} checked for `channels` (fcexport.spec.check_normalization), or None when neither is given."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise FcxError("normalisation needs both mean and std")
    return dict(zip(("mean", "std"), check_normalization(mean, std, channels)))


def _names_list(class_names) -> list[str]:
    """A list of names, or one of the known set names (a string is never split into letters)."""
    if isinstance(class_names, str):
        known = known_class_names(class_names)
        if known is None:
            _refuse_misspelt_set([class_names])
            raise FcxError(f"class_names {class_names!r} is not a known set ({', '.join(KNOWN_CLASS_SETS)}); pass a list of names")
        return known
    return [str(n) for n in class_names]


def from_state_dict(
    weights: str | Path,
    model_def: str,
    input_shape,
    model_args: dict | None = None,
    key: str | None = None,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    on_step=None,
    output: str | None = None,
) -> tuple[Program, ModelSpec]:
    """Build the user's model from its code, load the weights strictly, then as `from_module`."""
    weights = Path(weights)
    _step(on_step, f"reading {weights.name}")
    loaded, weights_sha256 = load_weights_file(weights)
    state_dict = find_state_dict(loaded, weights, key)
    _step(on_step, f"building {model_def}")
    module = build_user_model(model_def, model_args or {})
    state_dict = _strip_prefix(state_dict, module)
    check_weights(module, state_dict, str(weights))
    module.load_state_dict(state_dict, strict=True)
    architecture = {
        "model_def": model_def,
        "model_args": model_args or {},
        "weights": weights.name,
        "weights_sha256": weights_sha256,
    }
    return from_module(module, **_described(module, None, input_shape, class_names, mean, std), architecture=architecture, on_step=on_step,
                       output=output)


def _step(on_step, label: str) -> None:
    if on_step is not None:
        on_step(label)


def from_state_dict_isolated(weights, model_def: str, input_shape, model_args: dict | None = None, key: str | None = None,
                             class_names: list[str] | None = None, mean=None, std=None, on_step=None,
                             output: str | None = None) -> tuple[Program, ModelSpec]:
    """`from_state_dict` in a child process, so the user's code cannot end fcx: sys.exit, os._exit or any
    BaseException there is an error naming the model. What the child writes is read back as an untrusted
    model.pt (every check of checkpoint.read_model)."""
    import multiprocessing
    import tempfile

    from fcexport.checkpoint import read_model

    _check_arguments(weights, model_def, input_shape, mean, std)  # the usual mistakes, without a child's start-up
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or state inherited
    receive, send = context.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(prefix="fcx-import-") as scratch:
        staged = Path(scratch) / "model.pt"
        child = context.Process(target=_from_state_dict_child, daemon=True, args=(
            send, staged, weights, model_def, input_shape, model_args, key, class_names, mean, std, output))
        child.start()
        send.close()
        try:
            answer = _answer(receive, on_step)
            child.join()
        finally:
            if child.is_alive():  # Ctrl-C, or an error here: never leave the user's code running
                child.terminate()
                child.join(5)
        if answer is None or not isinstance(answer, dict):
            raise FcxError(f"{model_def}: the model's code ended the process (exit code {child.exitcode}) before the model "
                           "was stored; nothing was written")
        if "error" in answer:
            hint = answer.get("hint")
            raise FcxError(str(answer["error"]), hint=hint if hint in HINTS else None)
        stored = read_model(staged)
    return stored.program, stored.spec


def _answer(receive, on_step):
    """The child's answer (a dict), after passing on the steps it reports; None when it ended without one. JSON,
    not pickle: the child ran user code."""
    while True:
        try:
            message = json.loads(receive.recv_bytes(MAX_MESSAGE_BYTES).decode("utf-8"))
        except (EOFError, OSError, ValueError):  # ended, or sent something that is not ours
            return None
        if isinstance(message, dict) and set(message) == {"step"} and isinstance(message["step"], str):
            _step(on_step, message["step"][:200])
            continue
        return message


MAX_MESSAGE_BYTES = 1 << 20
MAX_SAID = 4_000  # characters of an error the child passes on (a key list can name keys of any length)


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_SAID else text[:MAX_SAID] + f" ... ({len(text) - MAX_SAID:,} more characters)"


def _check_arguments(weights, model_def: str, input_shape, mean, std) -> None:
    """What can be checked without the user's code: the shape, the normalisation, that the files are there."""
    if input_shape is not None:  # else the model's own (timm's pretrained_cfg, a transformers config) says it
        shape = parse_input_shape(input_shape)
        try:
            _normalization(mean, std, shape[0])
        except FcxError as wrong:
            try:  # a mean per channel of a channels-last shape (H,W,C): the model, built, names the shape's fix
                _normalization(mean, std, shape[-1])
            except FcxError:
                raise wrong from None
    if not Path(weights).is_file():
        raise FcxError(f"{weights}: weights file not found")
    split_model_def(model_def)


def split_model_def(model_def: str) -> tuple[str, str]:
    """`path/to/file.py:NAME` or `package.module:NAME` -> (location, NAME); a missing file is an error."""
    if not isinstance(model_def, str) or ":" not in model_def:
        raise FcxError(f"model definition must be FILE.py:NAME or package.module:NAME, got {model_def!r}")
    location, name = model_def.rsplit(":", 1)
    if location.endswith(".py") and not Path(location).is_file():
        raise FcxError(f"{location}: model file not found")
    return location, name


def _from_state_dict_child(send, staged: Path, weights, model_def, *args) -> None:
    """The child's side: build, export and store the model, then say how it went (JSON on `send`); `args` are
    from_state_dict's, the output's name last."""
    from fcexport.checkpoint import save_program

    def step(label: str) -> None:
        send.send_bytes(json.dumps({"step": label}).encode("utf-8"))

    try:
        program, spec = from_state_dict(weights, model_def, *args[:-1], on_step=step, output=args[-1])
        save_program(program, spec, staged)
        answer = {"ok": True}
    except FcxError as exc:
        answer = {"error": _bounded(str(exc)), "hint": exc.hint}
    except BaseException as exc:  # KeyboardInterrupt, GeneratorExit, the user's own BaseException subclasses
        said = f": {str(exc)[:500]}" if str(exc) else ""
        answer = {"error": f"{model_def}: the model's code raised {type(exc).__name__}{said}"}
    send.send_bytes(json.dumps(answer).encode("utf-8"))
    send.close()


def check_weights(model: nn.Module, state_dict: dict, where: str) -> None:
    """Strict comparison of a state dict with a model's own: missing and unexpected keys and shape
    mismatches are listed, the first few of each with counts, in one FcxError."""
    expected = model.state_dict()
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise FcxError(f"{where}: weights must be a dict of tensors")
    for key, tensor in state_dict.items():  # what load_state_dict would take apart or convert without a word
        kind = ("sparse" if tensor.layout != torch.strided else "quantised" if tensor.is_quantized
                else "complex" if tensor.is_complex() else None)
        if kind:
            raise FcxError(f"{where}: weight '{key[:80]}' is a {kind} tensor; fcexport imports dense real-valued weights "
                           "(save the float model's state_dict())")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    wrong = [f"{k} is {tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} in the model" for k in mismatched]
    problems = [f"{label} ({len(items)}): {', '.join(item[:200] for item in items[:3])}{', ...' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if items]
    if problems:
        counts = _head_counts(state_dict, expected, mismatched)
        hint = (f". The file's head has {counts[0]} classes, the model's {counts[1]}: build the model with the file's count "
                f"(--model-args '{{\"num_classes\": {counts[0]}}}', or the argument your factory takes), and name them with "
                "--classes") if counts else ""
        raise FcxError(f"{where}: weights do not match the model: {'; '.join(problems)}{hint}")
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise FcxError(f"{where}: weight '{key}' holds NaN or Inf values; the model is unusable")


def _head_counts(found: dict, expected: dict, mismatched: list[str]) -> tuple[int, int] | None:
    """When only the last layer's output size differs (a head made for another number of classes): (the file's class
    count, the model's); else None."""
    pairs = {(found[k].shape[0], expected[k].shape[0]) for k in mismatched
             if found[k].dim() >= 1 and found[k].shape[1:] == expected[k].shape[1:]}
    last = [k for k in expected if expected[k].is_floating_point()][-2:]  # the head's weight and bias
    if len(pairs) != 1 or not mismatched or not set(mismatched) <= set(last):
        return None
    return next(iter(pairs))


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
    try:
        is_file = path.is_file()
    except OSError:  # a name too long for a path (or otherwise impossible) is a list of names, not a file
        is_file = False
    if path.suffix.lower() in (".txt", ".names", ".csv") and not is_file:
        raise FcxError(f"{path}: class names file not found")
    if is_file:
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise FcxError(f"{path}: cannot read class names ({type(exc).__name__}); one UTF-8 name per line") from exc
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
        _refuse_misspelt_set(names)
    if not names:
        raise FcxError(f"no class names in {text!r}")
    return names


def _refuse_misspelt_set(names: list[str]) -> None:
    """One "name" that is nearly a known set (`fashion_mnist`) is a typo, not a one-class model."""
    import difflib

    close = difflib.get_close_matches(names[0].lower(), KNOWN_CLASS_SETS, n=1, cutoff=0.8) if len(names) == 1 else []
    if close:
        raise FcxError(f"class names {names[0]!r} is not a known set (did you mean {close[0]}?); the known sets are "
                       f"{', '.join(KNOWN_CLASS_SETS)}, or give a comma-separated list or a text file")


def find_state_dict(loaded, path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict itself, or the one a training checkpoint nests under `key` (or a usual key)."""
    if not isinstance(loaded, dict):
        raise FcxError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    if not loaded:
        raise FcxError(f"{path}: holds an empty dict: no weights")
    keys = ", ".join(str(k)[:80] for k in list(loaded)[:8])
    if key is not None:
        if not isinstance(loaded.get(key), dict):
            raise FcxError(f"{path}: has no state dict under key {str(key)[:80]!r} (keys: {keys})")
        loaded = loaded[key]
    elif not _is_state_dict(loaded):
        nested = [k for k in NESTED_KEYS if _is_state_dict(loaded.get(k))]
        if not nested:
            raise FcxError(f"{path}: no state dict found (keys: {keys}); name the key that holds it")
        loaded = loaded[nested[0]]
    if not _is_state_dict(loaded):
        raise FcxError(f"{path}: the state dict holds values that are not tensors")
    return loaded


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


# What wrappers put in front of every key: nn.DataParallel / DistributedDataParallel, torch.compile, Lightning (its
# LightningModule's own attribute, by convention `model`), and EMA wrappers (timm's ModelEmaV2: `module.`)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _strip_prefix(state_dict: dict, module: nn.Module) -> dict:
    """The state dict without the prefixes a wrapper added (WRAPPER_PREFIXES, in any nesting: `module._orig_mod.`),
    stripped while no key matches the model's and every key carries the prefix: first one whose removal makes keys
    match (a Lightning `model.` before a model's own `model.`), else one the model's own keys do not start with."""
    own = set(module.state_dict())
    while not own & set(state_dict):
        carried = {p: {k[len(p):]: v for k, v in state_dict.items()} for p in WRAPPER_PREFIXES
                   if all(k.startswith(p) for k in state_dict)}
        prefix = next((p for p, stripped in carried.items() if own & set(stripped)), None) or next(
            (p for p in carried if not any(k.startswith(p) for k in own)), None)
        if prefix is None:
            break
        state_dict = carried[prefix]
    return state_dict


def build_user_model(model_def: str, model_args: dict) -> nn.Module:
    """Import NAME from `path/to/file.py:NAME` or `package.module:NAME` and call it with `model_args`.

    This runs the user's own model code (their file or an installed package), once, at import time.
    """
    location, name = split_model_def(model_def)
    if not isinstance(model_args, dict):
        raise FcxError(f"model arguments must be a JSON object of keyword arguments, got {json.dumps(model_args)}")
    namespace = _import_location(location)
    factory = getattr(namespace, name, None)
    if location == "timm" and factory is None and hasattr(namespace, "create_model"):  # timm:NAME, any timm model
        if not namespace.is_model(name):
            raise FcxError(f"timm has no model named {name!r} (timm.list_models() lists them)")
        factory = lambda **kwargs: namespace.create_model(name, pretrained=False, **kwargs)  # noqa: E731
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
        module_name = f"fcexport_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        namespace = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = namespace  # dataclasses and pickling look the module up by name
        folder = str(path.resolve().parent)
        added = folder not in sys.path
        if added:  # as `python FILE.py` runs it: its own imports find the files beside it, while it runs
            sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(namespace)
        except (Exception, SystemExit) as exc:
            raise FcxError(f"{path}: running the model file failed: {type(exc).__name__}: {exc}") from exc
        finally:  # else a file beside it named like a module torch imports later (profile.py, secrets.py) would run
            if added and folder in sys.path:
                sys.path.remove(folder)
        return namespace
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as exc:
        here = Path(*location.split(".")).with_suffix(".py")
        if exc.name == location.split(".")[0] and here.is_file():  # a module in the current folder, named like a package
            return _import_location(str(here))
        raise FcxError(f"cannot import {location!r} ({type(exc).__name__}: {exc}); for a file, write FILE.py:NAME") from exc
    except Exception as exc:
        raise FcxError(f"cannot import {location!r} ({type(exc).__name__}: {exc})") from exc


# ---- models as the ecosystem ships them ------------------------------------------------------

HF_CONFIG, HF_PREPROCESSOR = "config.json", "preprocessor_config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
MAX_JSON_BYTES = 4 << 20
MAX_SHARDS = 256


def from_pretrained(source, input_shape=None, class_names: list[str] | None = None, mean=None, std=None,
                    on_step=None) -> tuple[Program, ModelSpec]:
    """A model as libraries ship it, with what it says about itself: a Hugging Face folder (`save_pretrained`:
    config.json naming an installed `transformers` class, safetensors or pytorch_model.bin weights, optional
    preprocessor_config.json), a live transformers model (its config), or a live timm model (its pretrained_cfg).
    Class names, mean / std and input size come from there unless given. Never runs code from the folder."""
    if isinstance(source, nn.Module):
        return from_module(source, **_described(source, None, input_shape, class_names, mean, std), on_step=on_step)
    folder = Path(source)
    _step(on_step, f"reading {folder.name} and building its model")
    module, described, architecture = _hf_folder(folder)
    return from_module(module, **_described(module, described, input_shape, class_names, mean, std), architecture=architecture, on_step=on_step)


def _hf_folder(folder: Path) -> tuple[nn.Module, dict, dict]:
    """(the model with the folder's weights loaded, its preprocessor config or {}, what to record of where it came from)."""
    from fcexport.checkpoint import load_weights_file

    config = _json_file(folder / HF_CONFIG)
    if "auto_map" in config or config.get("trust_remote_code"):
        raise FcxError(f"{folder / HF_CONFIG}: the model asks for the folder's own code (auto_map, trust_remote_code); "
                       "fcexport never runs code from a model folder: import it with --model-def and code you have read")
    named = config.get("architectures")
    if not (isinstance(named, list) and len(named) == 1 and isinstance(named[0], str)):
        raise FcxError(f"{folder / HF_CONFIG}: `architectures` must name the one model class, got {str(named)[:100]}")
    try:
        import transformers
        import transformers.utils.logging
    except ImportError as exc:
        raise FcxError(f"{folder}: a Hugging Face model folder needs transformers (pip install transformers)") from exc
    cls = getattr(transformers, named[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FcxError(f"{folder / HF_CONFIG}: {named[0][:100]} is not a model class of the installed transformers "
                       f"{transformers.__version__}")
    if config.get("quantization_config") is not None:
        raise FcxError(f"{folder / HF_CONFIG}: a quantised checkpoint (quantization_config); import the float32 model")
    config = {k: v for k, v in config.items() if k not in ("attn_implementation", "_attn_implementation")}  # (it can name
    # kernels to download: the model is built with plain "eager" attention, which every class has)
    weights = next((folder / name for name in HF_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise FcxError(f"{folder}: no weights ({', '.join(HF_WEIGHTS)})")
    shards = _shards(weights) if weights.name.endswith(".index.json") else [weights]
    state_dict, digests = {}, []
    for shard in shards:  # each read once, bounded and hashed here; transformers only renames what was read
        if shard.resolve().parent != folder.resolve():
            raise FcxError(f"{shard}: a link out of {folder}; the weights must be files in the model folder")
        loaded, digest = load_weights_file(shard)
        state_dict.update(find_state_dict(loaded, shard))
        digests.append(digest)
    held = sum(t.numel() for t in state_dict.values())
    _check_described_size(config, state_dict, folder)
    try:  # transformers maps the checkpoint's names to its current modules (they change between versions)
        transformers.utils.logging.disable_progress_bar()
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
        try:
            hf_config = cls.config_class.from_dict(config)
            with torch.device("meta"):  # what the config describes, sized before anything is allocated
                described_tensors = cls(hf_config).state_dict()
            wanted = sum(t.numel() for t in described_tensors.values())
            if wanted > 2 * held + (1 << 20):  # (tied weights may be stored once)
                raise FcxError(f"{folder / HF_CONFIG} describes a model of {wanted:,} values, its weights hold {held:,}: "
                               "they do not belong together")
            _check_head(described_tensors, state_dict, weights, folder)
            module, info = cls.from_pretrained(None, config=hf_config, state_dict=state_dict, output_loading_info=True,
                                               attn_implementation="eager")
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
    except FcxError:
        raise
    except Exception as exc:
        raise FcxError(f"{folder}: {named[0]} cannot be built from it ({type(exc).__name__}: {_first_line(exc)})") from exc
    problems = [f"{label} ({len(keys)}): {', '.join(map(str, list(keys)[:3]))}" for label, keys in
                (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")),
                 ("shape mismatch", info.get("mismatched_keys"))) if keys]
    if problems:
        raise FcxError(f"{weights}: weights do not match {named[0]}: {'; '.join(problems)}")
    described = {"config": config, "preprocessor": _json_file(folder / HF_PREPROCESSOR) if (folder / HF_PREPROCESSOR).is_file() else {}}
    architecture = {"transformers": named[0], "folder": folder.name, "weights": [s.name for s in shards], "weights_sha256": digests}
    return module.eval(), described, architecture


def _check_head(described: dict, state_dict: dict, weights: Path, folder: Path) -> None:
    """Weights whose shapes differ from what config.json describes, said with both sides (transformers 5 raises "set
    ignore_mismatched_sizes" and prints the details to a log fcexport keeps quiet); a head for another class count
    says what to change in config.json."""
    mismatched = [k for k, t in described.items() if k in state_dict and state_dict[k].shape != t.shape]
    if not mismatched:
        return
    wrong = [f"{k} is {tuple(state_dict[k].shape)} in the file, {tuple(described[k].shape)} in the model config.json describes"
             for k in mismatched]
    counts = _head_counts(state_dict, described, mismatched)
    hint = (f". The file's head has {counts[0]} classes, config.json's {counts[1]}: give config.json an id2label "
            f"(and num_labels) of the file's {counts[0]}") if counts else ""
    raise FcxError(f"{weights}: weights do not match {folder / HF_CONFIG}: shape mismatch ({len(wrong)}): "
                   f"{'; '.join(wrong[:3])}{hint}")


def _check_described_size(config: dict, state_dict: dict, folder: Path) -> None:
    """Layer counts a config could not hold weights for (a model has a tensor or more per layer), refused before the
    model is built at all: building 100,000 layers, even on the meta device, takes minutes."""
    for key, value in config.items():
        counts = value if isinstance(value, list) else [value]
        if any(word in key for word in ("layers", "depth", "blocks")) and all(type(v) is int for v in counts) \
                and sum(counts) > len(state_dict):
            raise FcxError(f"{folder / HF_CONFIG}: {key} {str(value)[:40]} asks for more layers than its weights have "
                           f"tensors ({len(state_dict):,}); they do not belong together")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _shards(index: Path) -> list[Path]:
    """The weight files a sharded checkpoint's index names, each in the folder."""
    mapping = _json_file(index).get("weight_map")
    files = sorted(set(mapping.values())) if isinstance(mapping, dict) and all(isinstance(v, str) for v in mapping.values()) else None
    if not files or len(files) > MAX_SHARDS or any(Path(f).name != f for f in files):
        raise FcxError(f"{index}: its weight_map must name up to {MAX_SHARDS} files in the folder")
    return [index.parent / f for f in files]


def _json_file(path: Path) -> dict:
    from fcexport.targets import read_bytes

    try:
        found = json.loads(read_bytes(path, MAX_JSON_BYTES))
    except (ValueError, RecursionError) as exc:
        raise FcxError(f"{path}: not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(found, dict):
        raise FcxError(f"{path}: not a JSON object")
    return found


def _described(module: nn.Module, described: dict | None, input_shape, class_names, mean, std) -> dict:
    """from_module's input_shape, class_names, mean, std and preprocess: the given ones, else what the model and its
    files say (a transformers config and image processor, timm's pretrained_cfg)."""
    pretrained = getattr(module, "pretrained_cfg", None)  # timm
    pretrained = pretrained if isinstance(pretrained, dict) else {}
    config = (described or {}).get("config") or _config_dict(module)
    processor = (described or {}).get("preprocessor") or {}
    if class_names is None and isinstance(config.get("id2label"), dict):
        labels = {int(k): str(v) for k, v in config["id2label"].items() if str(k).lstrip("-").isdigit()}
        class_names = [labels[i] for i in range(len(labels))] if sorted(labels) == list(range(len(labels))) else None
    if mean is None and std is None:
        if processor.get("image_mean") is not None and processor.get("do_normalize", True):
            mean, std = processor["image_mean"], processor.get("image_std")
            if processor.get("include_top") and isinstance(std, (list, tuple)) and all(isinstance(v, (int, float)) for v in std):
                std = [v * v for v in std]  # EfficientNet's processor divides by std once more (include_top)
        elif pretrained.get("mean") is not None:
            mean, std = pretrained["mean"], pretrained.get("std")
    if input_shape is None and pretrained.get("input_size"):
        input_shape = tuple(pretrained["input_size"])
    elif input_shape is None:
        side = _processor_side(processor) or config.get("image_size")
        side = side[0] if isinstance(side, (list, tuple)) and side else side
        if not isinstance(side, int):
            raise FcxError("the model does not say its input size: give it (--input-shape C,H,W)")
        channels = config.get("num_channels", 3)
        if type(channels) is not int:
            raise FcxError(f"the model's config says num_channels {str(channels)[:40]}; give --input-shape C,H,W")
        input_shape = (channels, side, side)
    preprocess = _processor_preparation(processor) if processor else _timm_preparation(pretrained)
    return {"input_shape": input_shape, "class_names": class_names, "mean": mean, "std": std,
            "preprocess": _fitting(preprocess, parse_input_shape(input_shape))}


RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's numbers


def _processor_preparation(processor: dict) -> Preprocess | None:
    """A transformers image processor's resize and centre crop (its `size`, `crop_size`, `crop_pct`, `resample`),
    None where it says none that fcexport can repeat."""
    size, crop = _side_pair(processor.get("size")), _side_pair(processor.get("crop_size")) if processor.get("do_center_crop") else None
    resample = RESAMPLE_CODES.get(processor.get("resample"), "bilinear")
    shortest = processor.get("size", {}).get("shortest_edge") if isinstance(processor.get("size"), dict) else None
    pct = processor.get("crop_pct") if isinstance(processor.get("crop_pct"), (int, float)) and 0 < processor["crop_pct"] <= 1 else None
    if not processor.get("do_resize", True) or (size is None and type(shortest) is not int):
        return None
    if size is not None:  # an exact size (ViT, BEiT, DeiT before its crop)
        return Preprocess("resize", resize=size, resample=resample)
    if pct is not None and crop is None:  # ConvNeXt's processor: crop_pct below 384 px
        return Preprocess("resize", resize=int(shortest / pct) if shortest < 384 else (shortest, shortest), resample=resample)
    return Preprocess("resize", resize=int(shortest / pct) if pct is not None else shortest, resample=resample)


def _timm_preparation(pretrained: dict) -> Preprocess | None:
    """timm's eval transform from a pretrained_cfg: resize to input / crop_pct ("center": the shorter side; "squash":
    both sides), then the centre crop. None for the modes fcexport cannot repeat ("border", a non-square "center")."""
    size, pct, mode = _side_pair(list(pretrained.get("input_size") or ())[1:]), pretrained.get("crop_pct", 0.875), pretrained.get("crop_mode", "center")
    if size is None or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
        return None
    resample = pretrained.get("interpolation") if pretrained.get("interpolation") in RESAMPLING else "bilinear"
    scaled = tuple(math.floor(side / pct) for side in size)
    if mode == "squash" or (mode == "center" and size[0] == size[1]):  # torchvision's CenterCrop rounds an odd margin
        return Preprocess("resize", resize=scaled if mode == "squash" else scaled[0], resample=resample, crop_offset="round")
    return None


def _side_pair(value) -> tuple[int, int] | None:
    """An image processor's size as (height, width): an int, {"height", "width"}, or a pair; else None."""
    if type(value) is int:
        return value, value
    if isinstance(value, dict):
        value = (value.get("height"), value.get("width"))
    return tuple(value) if isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value) else None


def _fitting(preprocess: Preprocess | None, shape: tuple[int, int, int]) -> Preprocess | None:
    """`preprocess` if its sizes cover the model's input (a described size the user did not override), else None."""
    if preprocess is not None:
        try:
            check_resize(preprocess.resize, tuple(shape[1:]))
        except FcxError:
            return None
    return preprocess


def _config_dict(module: nn.Module) -> dict:
    """A transformers model's config as a dict, else {}."""
    transformers = sys.modules.get("transformers")  # (a transformers model has imported it: nobody else pays for it)
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return {}
    found = module.config.to_dict()
    return found if isinstance(found, dict) else {}


def _processor_side(processor: dict) -> int | None:
    """The square side an image processor hands the model: its crop, else its resize."""
    for key in (("crop_size",) if processor.get("do_center_crop") else ()) + ("size",):
        value = processor.get(key)
        if type(value) is int:
            return value
        if isinstance(value, dict):
            for field in ("height", "shortest_edge"):
                if type(value.get(field)) is int:
                    return value[field]
    return None
