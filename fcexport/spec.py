"""ModelSpec: one typed description of a model, embedded in every artifact as plain JSON.

It says what the model takes (input shape, how an image file is prepared for it), what it returns
(class names), how it was made (architecture, dataset, training, provenance). Torch-free, so
`fcx predict` on an ONNX model can read it without importing torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from fcexport.errors import FcxError

# How `fcexport.preprocess` turns an image file into model input:
#   "object":    grayscale, background removed, object trimmed and fitted into `object_fill` of the
#                frame, bright on black (how Fashion-MNIST and MNIST were made);
#   "letterbox": colour or gray as the model's channels, resized with aspect kept, padded with black;
#   "resize":    resized to `resize` (an int: the shorter side, aspect kept; [h, w]: exactly), then the centre H x W
#                taken: timm's eval transform and Hugging Face's image processors.
# Every mode but "object" resizes with Pillow's filter `resample`.
PREPROCESS_MODES = ("object", "letterbox", "resize")
RESAMPLING = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # Pillow's filters, by Pillow's names
CROP_OFFSETS = ("floor", "round")  # an odd margin's half: floored (transformers) or rounded half to even (torchvision, timm)
MAX_RESIZE_RATIO = 16  # "resize": at most 16x the model's input side before the centre crop
MAX_INPUT_ELEMENTS = 3 * 1024 * 1024  # (C, H, W) up to 3 x 1024 x 1024: bounds every buffer made from a spec
MAX_CLASSES = 100_000
MAX_SPEC_DEPTH = 32  # a spec's JSON nests at most this deep (honest ones: 5)
# verify's random inputs (fcexport.parity) and reference.npz's: RANDOM_INPUTS for a classifier; a segmentation model's
# hold at most DENSE_VALUES output values (every pixel is a decision; 256 images of 21 x 224 x 224 float64 logits
# would take 2 GiB), and at least one image (whose output MAX_TENSOR_BYTES bounds)
RANDOM_INPUTS, DENSE_VALUES = 256, 1 << 24
RANDOM_SEED = 0


def random_pixels(input_shape, count: int, seed: int = RANDOM_SEED):
    """`count` uniform random images in [0, 1) from NumPy's PCG64, the same on every machine. Verify's random inputs,
    reference.npz's and export's own check are all the first rows of one seed's stream, so model.pt's float64
    answers computed for one (fcexport.machine_cache) serve the others."""
    import numpy as np

    return np.random.default_rng(seed).random((count, *input_shape), dtype=np.float32)
TASKS = ("classification", "segmentation")  # logits (N, classes), or per-pixel logits (N, classes, H, W)
MAX_TENSOR_BYTES = 1 << 28  # the memory of any one intermediate of one image, in any format: 256 MiB
MAX_TOTAL_BYTES = 1 << 32  # the memory of all intermediates of one image together: 4 GiB
MAX_MACS = 2 * 10**11  # multiply-accumulates of one image, in any format (densenet121: 2.9e9; torchvision's largest, vit_h_14: 1.7e11)
# values read, written or visited by one image, apart (fcexport.opset.SLOW weighs the slowest ops): one costs up to 8 ns
# where a convolution's multiply-accumulate costs 0.03-0.14, so 1e11 of them took hours; honest models visit 0.01-0.17
# values per multiply-accumulate (resnet50 1.1e8, vit_b_16 4.0e8), which this allows up to MAX_MACS
MAX_ELEMENTS = 2 * 10**10
MAX_OTHER_OUTPUTS = 16  # a model's outputs besides the predicted one that are kept (the others are named in its details)
OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # an exported file's output name (ONNX, Triton)
RESERVED_OUTPUT_NAMES = ("pixels", "logits")  # the input's and the predicted output's names in every exported file
MAX_CLASS_NAME = 256  # characters: a label, not a payload (a 50 MB name would take minutes to print)
MAX_NORMALIZATION, MIN_STD = 1e6, 1e-6  # mean/std on [0, 1] pixels; beyond these float32 models overflow


def _depth(value) -> int:
    """How deep a JSON-like value nests (a dict or list in a dict: 2), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, Mapping) else
                                                       node if isinstance(node, (list, tuple)) else ()))
    return deepest


def frozen(value):
    """A JSON-like value that cannot be changed: dicts become read-only mappings, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


def thawed(value):
    """The plain JSON value behind `frozen` (mappings to dicts, tuples to lists)."""
    if isinstance(value, Mapping):
        return {k: thawed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thawed(v) for v in value]
    return value


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes this model's input (PREPROCESS_MODES)."""

    mode: str = "object"
    object_fill: float = 1.0  # "object": the share of the frame objects fill in the training data
    resize: int | tuple[int, int] | None = None  # "resize": the shorter side, or (h, w), before the centre crop
    resample: str = "bilinear"  # every mode but "object": Pillow's filter
    crop_offset: str = "floor"  # "resize": where the centre crop starts when the margin is odd (CROP_OFFSETS)

    def __post_init__(self):
        if isinstance(self.resize, list):
            object.__setattr__(self, "resize", tuple(self.resize))

    def to_dict(self) -> dict:
        """The fields the mode uses, as JSON."""
        if self.mode == "object":
            return {"mode": "object", "object_fill": self.object_fill}
        resize = list(self.resize) if isinstance(self.resize, tuple) else self.resize
        return {"mode": self.mode, "resample": self.resample,
                **({"resize": resize, "crop_offset": self.crop_offset} if self.mode == "resize" else {})}

    def describe(self) -> str:
        """One line a person reads: what happens to an image file."""
        if self.mode == "object":
            return f"object (object fill {self.object_fill:.2f})"
        if self.mode == "letterbox":
            return f"letterbox, {self.resample}"
        resize = f"{self.resize[0]}x{self.resize[1]}" if isinstance(self.resize, tuple) else f"shorter side {self.resize}"
        return f"resize to {resize}, centre crop, {self.resample}"


@dataclass(frozen=True)
class Normalization:
    """The mean/std (on [0, 1] pixels) already inside the model: exported models take plain [0, 1] pixels."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))


@dataclass(frozen=True)
class Architecture:
    """What the model is: `kind` ("mlp", "cnn", "softmax" from fcx train; "imported") and the details that rebuild
    or trace it (a builder's config, or the model code and weights it was imported from)."""

    kind: str = "unknown"
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self):
        object.__setattr__(self, "details", frozen(self.details))


@dataclass(frozen=True)
class Provenance:
    """Where a file came from: the model.pt an artifact was made from (name and sha256), whether BatchNorm was
    folded (and what into what), the export's settings and times, and the versions of the tools that wrote it."""

    source: str | None = None
    source_sha256: str | None = None
    fused: bool = False
    folds: tuple = ()  # one mapping per fold (fcexport.folding.Fold)
    left: tuple = ()
    opset: int | None = None
    created: str | None = None
    exported: str | None = None
    versions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # torch, fcexport, onnx, ...

    def __post_init__(self):
        for name in ("folds", "left", "versions"):
            object.__setattr__(self, name, frozen(getattr(self, name)))


@dataclass(frozen=True)
class ModelSpec:
    """What a model takes and returns, and where it came from. Exported models take float32 pixels in
    [0, 1] of shape (N, C, H, W): `normalization` records the mean/std already inside the model. Frozen: change
    it with `dataclasses.replace`. `to_dict` / `from_dict` are the one codec every artifact embeds."""

    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    preprocess: Preprocess = Preprocess()
    normalization: Normalization | None = None
    architecture: Architecture = Architecture()
    dataset: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    training: Mapping[str, Any] | None = None
    provenance: Provenance = Provenance()
    task: str = "classification"  # TASKS
    output_shape: tuple[int, ...] | None = None  # one image's output: (classes,) or (classes, H, W)
    # the model's outputs besides the logits, exported and verified beside them: ((name, one image's shape), ...)
    other_outputs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # the model's last op already makes probabilities of its output (a softmax, or a sigmoid on one logit)
    probabilities: bool = False
    # the bytes one image keeps alive at once (fcexport.program.Shapes.peak, float32): it sizes each runtime call's
    # batch (fcexport.targets.chunk_size); 0 where no one recorded it (a file written before it was)
    peak_bytes: int = 0

    def __post_init__(self):
        shape, names = self.input_shape, self.class_names
        if isinstance(shape, (list, tuple)):
            object.__setattr__(self, "input_shape", tuple(shape))
        if isinstance(self.output_shape, list):
            object.__setattr__(self, "output_shape", tuple(self.output_shape))
        if self.output_shape is None and self.task == "classification" and isinstance(self.class_names, (list, tuple)):
            object.__setattr__(self, "output_shape", (len(self.class_names),))
        if isinstance(names, (list, tuple)):
            object.__setattr__(self, "class_names", tuple(names))
        if isinstance(self.other_outputs, (list, tuple)):
            object.__setattr__(self, "other_outputs", tuple(
                (pair[0], tuple(pair[1]) if isinstance(pair[1], (list, tuple)) else pair[1])
                if isinstance(pair, (list, tuple)) and len(pair) == 2 else pair for pair in self.other_outputs))
        for name in ("dataset", "metrics", "training"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, frozen(getattr(self, name)))
        self.validate()

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def dense(self) -> bool:
        """Whether the model answers per pixel (segmentation) rather than per image."""
        return self.task == "segmentation"

    @property
    def random_inputs(self) -> int:
        """How many random inputs a verdict on this model takes (RANDOM_INPUTS, fewer for large outputs: the logits and
        the other outputs together hold at most DENSE_VALUES values, which bounds the float64 reference's memory)."""
        if not self.dense and not self.other_outputs:
            return RANDOM_INPUTS
        values = math.prod(self.output_shape) + sum(math.prod(shape) for _, shape in self.other_outputs)
        return min(RANDOM_INPUTS, max(1, DENSE_VALUES // values))

    def validate(self, where: str = "model spec") -> None:
        """Types and ranges, checked before any buffer is sized from these values."""
        shape = self.input_shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(type(v) is int and v > 0 for v in shape)):
            raise FcxError(f"{where}: input_shape must be [C, H, W] of positive integers, got {list(shape) if isinstance(shape, tuple) else shape!r}")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise FcxError(f"{where}: input_shape {list(shape)} is larger than fcexport supports ({MAX_INPUT_ELEMENTS} values)")
        names = self.class_names
        if not (isinstance(names, tuple) and 1 <= len(names) <= MAX_CLASSES and all(isinstance(n, str) for n in names)):
            raise FcxError(f"{where}: class_names must be a non-empty list of strings")
        if len(set(names)) != len(names):
            raise FcxError(f"{where}: class_names has duplicates")
        long = next((n for n in names if len(n) > MAX_CLASS_NAME or not n), None)
        if long is not None:
            raise FcxError(f"{where}: class names must be 1 to {MAX_CLASS_NAME} characters, one is {len(long):,}")
        if self.task not in TASKS:
            raise FcxError(f"{where}: task must be one of {', '.join(TASKS)}, got {str(self.task)[:40]!r}")
        out = self.output_shape
        rank = 3 if self.dense else 1
        if not (isinstance(out, tuple) and len(out) == rank and all(type(v) is int and v > 0 for v in out)
                and out[0] == len(names) and math.prod(out) * 4 <= MAX_TENSOR_BYTES):
            raise FcxError(f"{where}: output_shape must be [classes{', H, W' if self.dense else ''}] with one class name "
                           f"per class, got {list(out) if isinstance(out, tuple) else str(out)[:40]}")
        others = self.other_outputs
        if not (isinstance(others, tuple) and len(others) <= MAX_OTHER_OUTPUTS and all(
                isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and OUTPUT_NAME.fullmatch(pair[0])
                and pair[0] not in RESERVED_OUTPUT_NAMES and isinstance(pair[1], tuple) and 1 <= len(pair[1]) <= 8
                and all(type(v) is int and v > 0 for v in pair[1]) and math.prod(pair[1]) * 4 <= MAX_TENSOR_BYTES
                for pair in others) and len({name for name, _ in others}) == len(others)):
            raise FcxError(f"{where}: other_outputs must be at most {MAX_OTHER_OUTPUTS} outputs, each a distinct name of letters, "
                           "digits and '_' (not pixels or logits) and one image's shape of positive sizes")
        if type(self.probabilities) is not bool:
            raise FcxError(f"{where}: probabilities must be true or false, got {str(self.probabilities)[:40]!r}")
        if type(self.peak_bytes) is not int or not 0 <= self.peak_bytes <= MAX_TOTAL_BYTES:
            raise FcxError(f"{where}: peak_bytes must be an integer from 0 to {MAX_TOTAL_BYTES:,}, got {str(self.peak_bytes)[:40]!r}")
        parts = {"preprocess": Preprocess, "architecture": Architecture, "provenance": Provenance}
        for name, kind in parts.items():
            if not isinstance(getattr(self, name), kind):
                raise FcxError(f"{where}: {name} must be a {kind.__name__}")
        if self.preprocess.mode not in PREPROCESS_MODES:
            raise FcxError(f"{where}: preprocess mode must be one of {', '.join(PREPROCESS_MODES)}, got {self.preprocess.mode!r}")
        fill = self.preprocess.object_fill
        if self.preprocess.mode == "object" and not (isinstance(fill, (int, float)) and 0.1 <= fill <= 1.0):
            raise FcxError(f"{where}: object_fill must be in [0.1, 1], got {fill!r}")
        if self.preprocess.mode != "object" and self.preprocess.resample not in RESAMPLING:
            raise FcxError(f"{where}: preprocess resample must be one of {', '.join(RESAMPLING)}, got {str(self.preprocess.resample)[:40]!r}")
        if self.preprocess.mode == "resize":
            check_resize(self.preprocess.resize, self.input_shape[1:], where)
            if self.preprocess.crop_offset not in CROP_OFFSETS:
                raise FcxError(f"{where}: preprocess crop_offset must be one of {', '.join(CROP_OFFSETS)}, got {str(self.preprocess.crop_offset)[:40]!r}")
        if self.normalization is not None:
            if not isinstance(self.normalization, Normalization):
                raise FcxError(f"{where}: normalization must be a Normalization")
            check_normalization(list(self.normalization.mean), list(self.normalization.std), self.channels, where)

    def to_dict(self) -> dict:
        """The spec as plain JSON values (the layout every artifact embeds; provenance flat, versions beside)."""
        provenance = {k: v for k, v in thawed(asdict_shallow(self.provenance)).items() if k != "versions" and v not in (None, (), [], {})}
        provenance |= {"fused": self.provenance.fused, **thawed(self.provenance.versions)}
        data = {
            "input_shape": list(self.input_shape),
            "class_names": list(self.class_names),
            "preprocess": self.preprocess.to_dict(),
            "normalization": None if self.normalization is None else {"mean": list(self.normalization.mean), "std": list(self.normalization.std)},
            "architecture": {"kind": self.architecture.kind, **thawed(self.architecture.details)},
            "dataset": thawed(self.dataset),
            "metrics": thawed(self.metrics),
            "training": thawed(self.training),
            "provenance": provenance,
        }
        if self.dense:  # a classifier's layout stays as it always was
            data |= {"task": self.task, "output_shape": list(self.output_shape)}
        if self.other_outputs:
            data["other_outputs"] = [{"name": name, "shape": list(shape)} for name, shape in self.other_outputs]
        if self.probabilities:  # a model returning logits keeps the layout it always had
            data["probabilities"] = True
        if self.peak_bytes:
            data["peak_bytes"] = self.peak_bytes
        return json.loads(json.dumps(data))  # plain values only (str subclasses such as torch.__version__ become str)

    @classmethod
    def from_dict(cls, data, where: str = "model spec") -> "ModelSpec":
        """Read the embedded layout back, checking every type before anything is built from it."""
        if not isinstance(data, dict):
            raise FcxError(f"{where}: model spec must be an object")
        if _depth(data) > MAX_SPEC_DEPTH:  # what reads it (freezing, rendering, JSON) recurses
            raise FcxError(f"{where}: its model spec nests deeper than {MAX_SPEC_DEPTH} levels")
        missing = {"input_shape", "class_names"} - set(data)
        if missing:
            raise FcxError(f"{where}: model spec lacks {', '.join(sorted(missing))}")
        for name in ("preprocess", "normalization", "architecture", "provenance", "dataset", "metrics", "training"):
            if data.get(name) is not None and not isinstance(data[name], dict):
                raise FcxError(f"{where}: {name} must be an object")
        preprocess = data.get("preprocess") or {"mode": "object"}
        normalization = data.get("normalization")
        architecture = dict(data.get("architecture") or {})
        provenance = dict(data.get("provenance") or {})
        shape, names = data["input_shape"], data["class_names"]
        try:
            if normalization is not None:
                channels = shape[0] if isinstance(shape, list) and shape and type(shape[0]) is int else 1
                normalization = Normalization(*check_normalization(normalization.get("mean"), normalization.get("std"), channels, where))
            return cls(
                input_shape=tuple(shape) if isinstance(shape, list) else shape,
                class_names=tuple(names) if isinstance(names, list) else names,
                preprocess=Preprocess(preprocess.get("mode"), preprocess.get("object_fill", 1.0), preprocess.get("resize"),
                                      preprocess.get("resample", "bilinear"), preprocess.get("crop_offset", "floor")),
                normalization=normalization,
                architecture=Architecture(str(architecture.pop("kind", "unknown")), frozen(architecture)),
                dataset=data.get("dataset"),
                metrics=data.get("metrics"),
                training=data.get("training"),
                provenance=_provenance(provenance, where),
                task=data.get("task", "classification"),
                output_shape=tuple(data["output_shape"]) if isinstance(data.get("output_shape"), list) else data.get("output_shape"),
                other_outputs=_other_outputs(data.get("other_outputs", []), where),
                probabilities=data.get("probabilities", False),
                peak_bytes=data.get("peak_bytes", 0),
            )
        except FcxError as exc:
            raise FcxError(str(exc).replace("model spec", where, 1)) from exc


MAX_VERSIONS = 32  # tool versions in a provenance: fcexport writes four; `fcx inspect` prints each

PROVENANCE_FIELDS = {"source": str, "source_sha256": str, "fused": bool, "folds": list, "left": list, "opset": int,
                     "created": str, "exported": str}


def _provenance(data: dict, where: str) -> Provenance:
    """Known fields by their types; any other string entry is a tool version (torch, onnx, ...)."""
    fields = {}
    for name, kind in PROVENANCE_FIELDS.items():
        value = data.pop(name, None)
        if value is not None and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
            raise FcxError(f"{where}: provenance {name} must be a {kind.__name__}, got {type(value).__name__}")
        if value is not None:
            fields[name] = frozen(value)
    versions = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and len(v) <= MAX_CLASS_NAME}
    if len(versions) > MAX_VERSIONS or any(len(k) > 64 for k in versions):
        raise FcxError(f"{where}: provenance lists {len(versions):,} tool versions; fcexport writes a few (torch, onnx, "
                       f"onnxruntime, fcexport) and reads at most {MAX_VERSIONS}, each named in at most 64 characters")
    return Provenance(**fields, versions=frozen(versions))


def asdict_shallow(part) -> dict:
    """A dataclass's fields as a dict, values as they are (dataclasses.asdict deep-copies, which mappings refuse)."""
    return {f.name: getattr(part, f.name) for f in fields(part)}


def check_normalization(mean, std, channels: int, where: str = "normalization") -> tuple[list[float], list[float]]:
    """mean/std as lists of floats: one value, or one per channel; std > 0, all finite."""
    values = []
    for name, given in (("mean", mean), ("std", std)):
        items = list(given) if isinstance(given, (list, tuple)) else [given]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in items):
            raise FcxError(f"{where}: {name} must be finite numbers, got {given!r}")
        if not all(abs(v) <= MAX_NORMALIZATION for v in items):
            raise FcxError(f"{where}: {name} must be within +-{MAX_NORMALIZATION:g} (pixels are in [0, 1]), got {given!r}")
        if len(items) not in (1, channels):
            wanted = "1 value" if channels == 1 else f"1 or {channels} values (one per channel)"
            raise FcxError(f"{where}: {name} needs {wanted}, got {len(items)}")
        values.append([float(v) for v in items])
    if len(values[0]) != len(values[1]):
        raise FcxError(f"{where}: mean and std need the same number of values")
    if not all(s >= MIN_STD for s in values[1]):
        raise FcxError(f"{where}: std must be >= {MIN_STD:g} (smaller does not survive float32 division), got {values[1]}")
    return values[0], values[1]


def check_resize(resize, size: tuple[int, int], where: str = "preprocess") -> None:
    """A "resize" mode's size covers the centre crop of `size` (H, W) and stays within MAX_RESIZE_RATIO of it."""
    pairs = [(resize, max(size))] if type(resize) is int else list(zip(resize, size)) if isinstance(resize, tuple) and len(resize) == 2 else []
    if not pairs or not all(type(r) is int and s <= r <= MAX_RESIZE_RATIO * s for r, s in pairs):
        raise FcxError(f"{where}: preprocess resize must be the shorter side (an integer from {max(size)}) or [h, w] "
                       f"from [{size[0]}, {size[1]}], at most {MAX_RESIZE_RATIO}x the input, got {str(resize)[:40]}")


def default_preprocess(channels: int, object_fill: float = 1.0, dense: bool = False) -> Preprocess:
    """Gray classifiers get Fashion-MNIST-style object preparation (the object cut out); colour models and every
    segmentation model a letterboxed resize (a mask maps back onto the file's own pixels)."""
    return Preprocess("object", object_fill) if channels == 1 and not dense else Preprocess("letterbox")


def _other_outputs(value, where: str) -> tuple:
    """other_outputs' JSON ([{"name", "shape"}, ...]) as ModelSpec takes it; validate() checks the values."""
    if not isinstance(value, list) or len(value) > MAX_OTHER_OUTPUTS or not all(
            isinstance(item, dict) and set(item) == {"name", "shape"} and isinstance(item["shape"], list) for item in value):
        raise FcxError(f"{where}: other_outputs must be a list of at most {MAX_OTHER_OUTPUTS} {{name, shape}} objects")
    return tuple((item["name"], tuple(item["shape"])) for item in value)
