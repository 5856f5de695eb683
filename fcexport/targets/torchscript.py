"""Exporter and runtime: a program -> frozen TorchScript (model.ts) with its spec in `_extra_files`.

The program's interpreter is traced (`torch.jit.trace`) and frozen: weights become constants and the
graph holds only the ATen ops. Tracing keeps a dynamic batch through the size ops (fcexport.program);
the result is checked at two other batch sizes, and a model whose batch the trace cannot keep is refused
with the reason (model.onnx still carries it). TorchScript files are code: the runtime loads one only
after `checks` have vetted its records (fcx verify: equal to a fresh export), and predict never picks one
unasked. TorchScript is deprecated upstream; torch.export's model.pt2 is its successor.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec
from fcexport.targets import (METADATA_FILE, Checks, exact_float32, Exporter, ExportSettings, Predictor, Runtime, archive_description, archive_fingerprint,
                              module_predictor, tapped_layers, torch_device, torch_runner)

log = logging.getLogger(__name__)
FILE = "model.ts"
# TorchScript's passes recurse over the graph: a 10,003-node program exported in 3.5 s, a 19,990-node one
# segfaulted inside torch (benchmarks/graph_size.py). Longer programs are refused with a reason instead.
MAX_TORCHSCRIPT_NODES = 10_000


@contextlib.contextmanager
def quiet_torchscript_deprecation():
    """torch.jit.* warns on every call that TorchScript is deprecated. We use it on purpose (users ask
    for .ts artifacts), so the warning is logged at debug level instead of shown on every command."""
    import warnings

    import torch

    log.debug("TorchScript is deprecated upstream in favour of torch.export; model.pt2 is its successor")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the exporter checks its trace itself
        yield


def torchscript_bytes(program, spec: ModelSpec) -> bytes:
    """Trace, freeze and serialise in memory (a full disk is then a Python OSError, never a C++ abort)."""
    import torch

    from fcexport.program import ProgramModule

    if len(program.nodes) > MAX_TORCHSCRIPT_NODES:
        raise FcxError(f"the program has {len(program.nodes):,} nodes; TorchScript export is limited to "
                       f"{MAX_TORCHSCRIPT_NODES:,} (torch crashes on much longer graphs): use model.onnx")
    module = ProgramModule(program, every_output=True).eval()
    shape = tuple(spec.input_shape)
    generator = torch.Generator().manual_seed(0)
    buffer = io.BytesIO()
    # a trace records each convolution's cuDNN flags as constants: traced in exact float32, the file never turns
    # TF32 on by itself on a GPU (traced with the defaults, model.ts differed from the CPU by 3e-4 on an H200)
    with quiet_torchscript_deprecation(), torch.no_grad(), exact_float32():
        try:
            frozen = torch.jit.freeze(torch.jit.trace(module, torch.rand(2, *shape, generator=generator), check_trace=False))
        except Exception as exc:
            raise FcxError(f"TorchScript cannot trace this model ({type(exc).__name__}: {str(exc).strip()[:200]})") from exc
        for batch in (1, 3):
            x = torch.rand(batch, *shape, generator=generator)
            try:
                traced, expected = frozen(x), module(x)
                pairs = zip(traced, expected) if isinstance(expected, tuple) else [(traced, expected)]
                same = all(a.shape == b.shape and bool((a - b).abs().max() <= 1e-3 * (1 + b.abs().max())) for a, b in pairs)
            except Exception:
                same = False
            if not same:
                raise FcxError(f"TorchScript cannot keep this model's dynamic batch (the trace differs at batch {batch}); "
                               "use model.onnx")
        torch.jit.save(frozen, buffer, _extra_files={METADATA_FILE: json.dumps(spec.to_dict())})
    return buffer.getvalue()


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    from fcexport.files import write_bytes_atomic

    write_bytes_atomic(stage / FILE, torchscript_bytes(program, spec))


def _per_save(name: str) -> bool:
    """Records that differ between two saves of one module: debug source ranges (offsets into the code, read only
    for error messages) and the save's id."""
    return name.endswith(".debug_pkl") or name == ".data/serialization_id"


def torchscript_fingerprint(data: bytes, path: Path | str = FILE) -> tuple[ModelSpec, dict[str, str]]:
    """(spec, fingerprint) of a TorchScript archive from its bytes: code, pickles and tensors, without loading it."""
    return archive_fingerprint(data, path, f"extra/{METADATA_FILE}", _per_save)


def open_torchscript(files: tuple[Path, ...], device: str, checks: Checks, backend: str) -> Predictor:
    """Load a TorchScript file, read once, after `checks` have seen its spec and fingerprint."""
    import torch

    path = files[0]
    dev = torch_device(device)
    data = checks.read(path)
    spec, found = torchscript_fingerprint(data, path)
    checks.vet(path, backend, spec, found)
    try:
        with quiet_torchscript_deprecation():
            module = torch.jit.load(io.BytesIO(data), map_location=dev)
    except Exception as exc:  # corrupt zip, bad pickle: an unusable file
        raise FcxError(f"{path}: not a valid fcexport TorchScript file ({type(exc).__name__})", hint="export") from exc
    layers = None if checks.source is None else exported_layers(checks.source(spec), spec, dev)  # verify: where it broke
    return module_predictor(module, backend, device, path, spec, layers=layers)


def exported_layers(program, spec: ModelSpec, dev, prepare=lambda tap: tap) -> tuple:
    """A Predictor's `layers` for model.ts's runtime: the program's LayerTap (after `prepare`, where a test breaks
    one layer) traced and frozen as model.ts is, for the batch at hand, saved and loaded onto `dev` as model.ts is."""
    import torch

    from fcexport.program import LayerTap

    def run_tap(x):
        buffer = io.BytesIO()
        with quiet_torchscript_deprecation(), torch.no_grad(), exact_float32():
            torch.jit.save(torch.jit.freeze(torch.jit.trace(prepare(LayerTap(program)).eval(), torch.from_numpy(x), check_trace=False)), buffer)
            buffer.seek(0)
            return torch_runner(torch.jit.load(buffer, map_location=dev), dev)(x)

    return tapped_layers(program, spec, run_tap)


EXPORTER = Exporter(name="torchscript", files=(FILE,), format="torchscript", write=write,
                    fingerprint=lambda data: torchscript_fingerprint(data)[1],
                    summary="TorchScript, traced and frozen (deprecated upstream: see pt2)",
                    describe=archive_description(torchscript_fingerprint))
RUNTIME = Runtime(name="torchscript", format="torchscript", devices=("cpu", "cuda"), open=open_torchscript,
                  runs={"torchscript": "torchscript"}, summary="libtorch's TorchScript interpreter")
