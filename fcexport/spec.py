"""ModelSpec: one typed description of a model, embedded in every artifact as plain JSON.

It says what the model takes (input shape, how an image file is prepared for it), what it returns
(class names), how it was made (architecture, dataset, training, provenance). Torch-free, so
`fcx predict` on an ONNX model can read it without importing torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from fcexport.errors import FcxError

# How `fcexport.preprocess` turns an image file into model input:
#   "object":    grayscale, background removed, object trimmed and fitted into `object_fill` of the
#                frame, bright on black (how Fashion-MNIST and MNIST were made);
#   "letterbox": colour or gray as the model's channels, resized with aspect kept, padded with black.
PREPROCESS_MODES = ("object", "letterbox")
MAX_INPUT_ELEMENTS = 3 * 1024 * 1024  # (C, H, W) up to 3 x 1024 x 1024: bounds every buffer made from a spec
MAX_CLASSES = 100_000
MAX_TENSOR_BYTES = 1 << 28  # the memory of any one intermediate of one image, in any format: 256 MiB
MAX_TOTAL_BYTES = 1 << 32  # the memory of all intermediates of one image together: 4 GiB
MAX_MACS = 10**11  # multiply-accumulates of one image, in any format (densenet121: 2.9e9, a 60M-parameter ViT: ~1.5e10)
MAX_CLASS_NAME = 256  # characters: a label, not a payload (a 50 MB name would take minutes to print)
MAX_NORMALIZATION, MIN_STD = 1e6, 1e-6  # mean/std on [0, 1] pixels; beyond these float32 models overflow


@dataclass
class ModelSpec:
    """What a model takes and returns, and where it came from. Exported models take float32 pixels in
    [0, 1] of shape (N, C, H, W): `normalization` records the mean/std already inside the model."""

    input_shape: list[int]
    class_names: list[str]
    preprocess: dict = field(default_factory=lambda: {"mode": "object", "object_fill": 1.0})
    normalization: dict | None = None  # {"mean": [...], "std": [...]} on [0, 1] pixels
    architecture: dict = field(default_factory=dict)  # {"kind": "mlp", ...} or {"kind": "imported", ...}
    dataset: dict | None = None
    metrics: dict | None = None
    training: dict | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    def validate(self, where: str = "model spec") -> None:
        """Types and ranges, checked before any buffer is sized from these values."""
        shape = self.input_shape
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v > 0 for v in shape)):
            raise FcxError(f"{where}: input_shape must be [C, H, W] of positive integers, got {shape!r}")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise FcxError(f"{where}: input_shape {shape} is larger than fcexport supports ({MAX_INPUT_ELEMENTS} values)")
        names = self.class_names
        if not (isinstance(names, list) and 1 <= len(names) <= MAX_CLASSES and all(isinstance(n, str) for n in names)):
            raise FcxError(f"{where}: class_names must be a non-empty list of strings")
        if len(set(names)) != len(names):
            raise FcxError(f"{where}: class_names has duplicates")
        long = next((n for n in names if len(n) > MAX_CLASS_NAME or not n), None)
        if long is not None:
            raise FcxError(f"{where}: class names must be 1 to {MAX_CLASS_NAME} characters, one is {len(long):,}")
        mode = self.preprocess.get("mode") if isinstance(self.preprocess, dict) else None
        if mode not in PREPROCESS_MODES:
            raise FcxError(f"{where}: preprocess mode must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}")
        fill = self.preprocess.get("object_fill", 1.0)
        if mode == "object" and not (isinstance(fill, (int, float)) and 0.1 <= fill <= 1.0):
            raise FcxError(f"{where}: object_fill must be in [0.1, 1], got {fill!r}")
        if self.normalization is not None:
            check_normalization(self.normalization.get("mean"), self.normalization.get("std"), self.channels, where)
        for name in ("architecture", "provenance"):
            if not isinstance(getattr(self, name), dict):
                raise FcxError(f"{where}: {name} must be an object")

    def to_dict(self) -> dict:
        """Plain JSON values only (a JSON round trip drops str subclasses such as torch.__version__)."""
        return json.loads(json.dumps(asdict(self)))

    def with_provenance(self, **fields) -> "ModelSpec":
        """A copy whose provenance has `fields` added; this spec is left as it is."""
        return ModelSpec.from_dict({**self.to_dict(), "provenance": {**self.provenance, **fields}})

    @classmethod
    def from_dict(cls, data, where: str = "model spec") -> "ModelSpec":
        if not isinstance(data, dict):
            raise FcxError(f"{where}: model spec must be an object")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        missing = {"input_shape", "class_names"} - set(known)
        if missing:
            raise FcxError(f"{where}: model spec lacks {', '.join(sorted(missing))}")
        try:
            spec = cls(**{**known, "preprocess": known.get("preprocess") or {"mode": "object", "object_fill": 1.0}})
        except FcxError as exc:
            raise FcxError(str(exc).replace("model spec", where, 1)) from exc
        return spec


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


def default_preprocess(channels: int, object_fill: float = 1.0) -> dict:
    """Gray models get Fashion-MNIST-style object preparation; colour models a letterboxed resize."""
    return {"mode": "object", "object_fill": object_fill} if channels == 1 else {"mode": "letterbox"}
