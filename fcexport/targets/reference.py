"""Exporter: reference.npz, the proof that travels. model.pt's answers in float64 on spec.random_inputs inputs made from a
seed, the same verify compares with (recalled where this machine computed them: fcexport.machine_cache), and its own
float32 error on them (the noise band), with the spec. Listed in the manifest and covered by the signature like
every file, so a machine without torch or model.pt judges the files it can run against it (fcx verify --reference).
Plain arrays in NumPy's format, read with allow_pickle=False.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec
from fcexport.targets import Exporter, ExportSettings

FILE = "reference.npz"
SEED = 0


def reference_inputs(input_shape, count: int, seed: int = SEED) -> np.ndarray:
    """The reference's inputs: uniform random pixels from NumPy's PCG64, the same on every machine."""
    return np.random.default_rng(seed).random((count, *input_shape), dtype=np.float32)


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    """`program` is model.pt's own (the exporter is `from_source`); its answers on these inputs are recalled where this
    machine computed them (fuse-bn --verify does: verify's random inputs are these), else computed and recorded."""
    from fcexport import machine_cache
    from fcexport.files import write_bytes_atomic
    from fcexport.targets.program import float64_answers

    x = reference_inputs(spec.input_shape, spec.random_inputs)  # the random part of verify's own budget
    logits, own = machine_cache.answers(spec.provenance.source_sha256, spec.output_shape, x,
                                        lambda part: float64_answers(program, spec, stage / FILE, part))
    own_error = float(own.max(initial=0.0))
    buffer = io.BytesIO()
    np.savez(buffer, seed=np.int64(SEED), count=np.int64(len(x)), input_shape=np.array(spec.input_shape), logits=logits,
             own_error=np.float64(own_error), spec=np.array(json.dumps(spec.to_dict())))
    write_bytes_atomic(stage / FILE, buffer.getvalue())


def describe(data: bytes, path: Path) -> tuple[ModelSpec, dict]:
    """The spec and what the reference holds, read with allow_pickle=False, never run."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as found:
            spec = ModelSpec.from_dict(json.loads(str(found["spec"])), str(path))
            return spec, {"inputs": int(found["count"]), "seed": int(found["seed"]), "own float32 error": f"{float(found['own_error']):.1e}"}
    except FcxError:
        raise
    except Exception as exc:
        raise FcxError(f"{path}: not a readable reference ({type(exc).__name__})", hint="export") from exc


EXPORTER = Exporter(name="reference", files=(FILE,), format="reference", write=write, describe=describe, from_source=True,
                    summary="model.pt's float64 answers on seeded inputs: verify without torch or model.pt")
