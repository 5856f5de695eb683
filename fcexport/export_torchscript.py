"""Exporter: a program -> frozen TorchScript (model.ts) with its spec in `_extra_files`.

The program's interpreter is traced (`torch.jit.trace`) and frozen: weights become constants and the
graph holds only the ATen ops. Tracing keeps a dynamic batch through the size ops (fcexport.program);
the result is checked at two other batch sizes, and a model whose batch the trace cannot keep is refused
with the reason (model.onnx still carries it).
"""

from __future__ import annotations

import io
import json

import torch

from fcexport.errors import FcxError
from fcexport.program import Program, ProgramModule
from fcexport.runtimes import METADATA_FILE, quiet_torchscript_deprecation
from fcexport.spec import ModelSpec

# TorchScript's passes recurse over the graph: a 10,003-node program exported in 3.5 s, a 19,990-node one
# segfaulted inside torch (benchmarks/graph_size.py). Longer programs are refused with a reason instead.
MAX_TORCHSCRIPT_NODES = 10_000


def torchscript_bytes(program: Program, spec: ModelSpec) -> bytes:
    """Trace, freeze and serialise in memory (a full disk is then a Python OSError, never a C++ abort)."""
    if len(program.nodes) > MAX_TORCHSCRIPT_NODES:
        raise FcxError(f"the program has {len(program.nodes):,} nodes; TorchScript export is limited to "
                       f"{MAX_TORCHSCRIPT_NODES:,} (torch crashes on much longer graphs): use model.onnx")
    module = ProgramModule(program).eval()
    shape = tuple(spec.input_shape)
    generator = torch.Generator().manual_seed(0)
    buffer = io.BytesIO()
    with quiet_torchscript_deprecation(), torch.no_grad():
        try:
            frozen = torch.jit.freeze(torch.jit.trace(module, torch.rand(2, *shape, generator=generator), check_trace=False))
        except Exception as exc:
            raise FcxError(f"TorchScript cannot trace this model ({type(exc).__name__}: {str(exc).strip()[:200]})") from exc
        for batch in (1, 3):
            x = torch.rand(batch, *shape, generator=generator)
            try:
                traced, expected = frozen(x), module(x)
                same = traced.shape == expected.shape and bool((traced - expected).abs().max() <= 1e-3 * (1 + expected.abs().max()))
            except Exception:
                same = False
            if not same:
                raise FcxError(f"TorchScript cannot keep this model's dynamic batch (the trace differs at batch {batch}); "
                               "use model.onnx")
        torch.jit.save(frozen, buffer, _extra_files={METADATA_FILE: json.dumps(spec.to_dict())})
    return buffer.getvalue()
