"""Exporter: a program -> model.onnx (dynamic batch, named input/output, spec in metadata_props, fully checked).

Exported models take float32 pixels in [0, 1] of shape (N, C, H, W) and return logits.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.onnx_checks import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, describe_onnx, onnx_fingerprint
from fcexport.spec import ModelSpec
from fcexport.targets import Exporter, ExportSettings, quiet_loggers, quiet_warnings


def onnx_bytes(program, spec: ModelSpec, opset: int = ExportSettings.opset) -> bytes:
    """Export (opset checked by ExportSettings; 18 is the dynamo exporter's own, 17 goes through onnx's converter) the program's interpreter with torch's dynamo exporter (a symbolic batch dimension), embed the
    spec in metadata_props, check it fully, and serialise in memory. Deterministic: the same program and
    spec give the same graph, which is what `fcx verify` compares an artifact with."""
    import onnx
    import torch

    from fcexport.program import ProgramModule

    example = torch.rand(2, *spec.input_shape, generator=torch.Generator().manual_seed(0))  # batch >= 2: not specialised to 1
    try:
        # torch.onnx and onnxscript print progress, and log notes about opset conversion on every call
        with quiet_warnings(), quiet_loggers("torch.onnx", "onnxscript"), contextlib.redirect_stdout(io.StringIO()):
            exported = torch.onnx.export(
                ProgramModule(program).eval(), (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, verbose=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FcxError(f"ONNX export failed ({type(exc).__name__}: {first}); try without fusing or another opset") from exc
    proto = exported.model_proto
    proto.doc_string = "fcexport classifier: float32 pixels in [0, 1] (N, C, H, W) -> logits (N, classes)"
    del proto.metadata_props[:]
    for key, value in spec.to_dict().items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    from fcexport.files import write_bytes_atomic

    write_bytes_atomic(stage / ONNX_FILE, onnx_bytes(program, spec, settings.opset))


EXPORTER = Exporter(name="onnx", files=(ONNX_FILE,), format="onnx", write=write, fingerprint=onnx_fingerprint,
                    summary="ONNX (opset >= 17, dynamic batch): onnxruntime, OpenVINO, Triton", describe=describe_onnx)
