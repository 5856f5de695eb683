"""Exporter: reference.npz, the proof that travels. model.pt's answers in float64 on spec.random_inputs inputs made from a
seed, the same verify compares with (recalled where this machine computed them: fcexport.machine_cache), and its own
float32 error on them (the noise band), with the spec. Listed in the manifest and covered by the signature like
every file, so a machine without torch or model.pt judges the files it can run against it (fcx verify --reference).
Plain arrays in NumPy's format, read with allow_pickle=False.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcexport.errors import FcxError
from fcexport.spec import RANDOM_SEED, ModelSpec, random_pixels
from fcexport.targets import Exporter, ExportSettings

FILE = "reference.npz"


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    """`program` is model.pt's own (the exporter is `from_source`); its answers on these inputs are recalled where this
    machine computed them (fuse-bn --verify does: verify's random inputs are these), else computed and recorded."""
    from fcexport import machine_cache
    from fcexport.files import write_bytes_atomic
    from fcexport.targets.program import float64_answers

    x = random_pixels(spec.input_shape, spec.random_inputs)  # the random part of verify's own budget
    logits, own = machine_cache.answers(spec.provenance.source_sha256, spec.output_shape, x,
                                        lambda part: float64_answers(program, spec, stage / FILE, part))
    own_error = float(own.max(initial=0.0))
    buffer = io.BytesIO()
    np.savez(buffer, seed=np.int64(RANDOM_SEED), count=np.int64(len(x)), input_shape=np.array(spec.input_shape), logits=logits,
             own_error=np.float64(own_error), spec=np.array(json.dumps(spec.to_dict())))
    write_bytes_atomic(stage / FILE, buffer.getvalue())


@dataclass(frozen=True)
class Reference:
    """What a reference.npz holds, checked: its inputs are made from `seed` (spec.random_pixels), `logits` are model.pt's
    float64 answers on them (count, *spec.output_shape), `own_error` its float32 error on them."""

    spec: ModelSpec
    seed: int
    count: int
    logits: np.ndarray
    own_error: float

    @property
    def inputs(self) -> np.ndarray:
        return random_pixels(self.spec.input_shape, self.count, self.seed)


def read(data: bytes, path: Path) -> Reference:
    """A reference.npz's bytes, every array's header read before its values (no pickles, nothing larger than the file)
    and every value checked: one FcxError for anything that is not what export writes."""
    try:
        arrays = _npz_arrays(data, ("seed", "count", "input_shape", "logits", "own_error", "spec"))
        spec = ModelSpec.from_dict(json.loads(str(arrays["spec"].item())), str(path))
        scalars = [arrays[k] for k in ("seed", "count", "own_error")]
        if any(a.shape != () for a in scalars) or any(a.dtype.kind not in "iuf" for a in scalars):
            raise ValueError("seed, count and own_error must be numbers")
        seed, count, own = int(arrays["seed"]), int(arrays["count"]), float(arrays["own_error"])
        shape, logits = arrays["input_shape"], arrays["logits"]
    except FcxError:
        raise
    except Exception as exc:  # zip, format, a missing key, a header that lies, a value of the wrong kind
        raise FcxError(f"{path}: not a readable reference ({type(exc).__name__})", hint="export") from exc
    if not (shape.dtype.kind in "iu" and shape.tolist() == list(spec.input_shape) and 0 <= seed < 2**63
            and 0 < count <= spec.random_inputs and logits.dtype == np.float64
            and logits.shape == (count, *spec.output_shape) and np.isfinite(logits).all() and math.isfinite(own) and own >= 0):
        raise FcxError(f"{path}: its arrays do not describe a reference of this model ({count} inputs of "
                       f"{spec.random_inputs} at most, finite float64 answers of shape {[count, *spec.output_shape]})", hint="export")
    return Reference(spec, seed, count, logits, own)


def _npz_arrays(data: bytes, keys) -> dict[str, np.ndarray]:
    """The named arrays of an .npz file's bytes, each one's header read first: a plain dtype, and no more values
    than the file's own bytes hold (a deflated member cannot grow past that), then exactly those bytes read."""
    import zipfile

    arrays = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for key in keys:
            with archive.open(f"{key}.npy") as member:
                major, _ = np.lib.format.read_magic(member)
                header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = header(member)
                size = math.prod(shape) * dtype.itemsize
                if dtype.hasobject or size > len(data):
                    raise ValueError(f"{key}: {shape} {dtype} in a {len(data)}-byte file")
                values = member.read(size)
                if len(values) != size:
                    raise ValueError(f"{key}: truncated")
                arrays[key] = np.frombuffer(values, dtype).reshape(shape, order="F" if fortran else "C")
    return arrays


def describe(data: bytes, path: Path) -> tuple[ModelSpec, dict]:
    """The spec and what the reference holds, checked as verify reads it, never run."""
    found = read(data, path)
    return found.spec, {"inputs": found.count, "seed": found.seed, "own float32 error": f"{found.own_error:.1e}"}


EXPORTER = Exporter(name="reference", files=(FILE,), format="reference", write=write, describe=describe, from_source=True,
                    summary="model.pt's float64 answers on seeded inputs: verify without torch or model.pt")
