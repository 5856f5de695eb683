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
from fcexport.targets import Exporter, ExportSettings, quiet_loggers, quiet_warnings, tapped_layers


def onnx_bytes(program, spec: ModelSpec, opset: int = ExportSettings.opset) -> bytes:
    """Export (opset checked by ExportSettings; 18 is the dynamo exporter's own, 17 goes through onnx's converter) the program's interpreter with torch's dynamo exporter (a symbolic batch dimension), embed the
    spec in metadata_props, check it fully, and serialise in memory. Deterministic: the same program and
    spec give the same graph, which is what `fcx verify` compares an artifact with."""
    import onnx
    import torch

    from fcexport.program import ProgramModule

    example = torch.rand(2, *spec.input_shape, generator=torch.Generator().manual_seed(0))  # batch >= 2: not specialised to 1
    proto = _exported(ProgramModule(program), example, ({0: torch.export.Dim("batch")},), opset)
    proto.doc_string = ("fcexport segmentation model: float32 pixels in [0, 1] (N, C, H, W) -> per-pixel logits (N, classes, H, W)"
                        if spec.dense else "fcexport classifier: float32 pixels in [0, 1] (N, C, H, W) -> logits (N, classes)")
    del proto.metadata_props[:]
    for key, value in spec.to_dict().items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def layer_tap_bytes(program, input_shape, batch: int, opset: int = ExportSettings.opset) -> bytes:
    """The same export of fcexport.program.LayerTap (every layer's output besides the logits, in one tensor) for a
    fixed batch: the copy verify runs through a failing row's runtime to find the layer where it broke."""
    import torch

    from fcexport.program import LayerTap

    return _exported(LayerTap(program), torch.rand(batch, *input_shape), None, opset).SerializeToString()


def _exported(module, example, dynamic_shapes, opset: int):
    import torch

    try:
        # torch.onnx and onnxscript print progress, and log notes about opset conversion on every call
        with quiet_warnings(), quiet_loggers("torch.onnx", "onnxscript"), contextlib.redirect_stdout(io.StringIO()):
            exported = torch.onnx.export(
                module.eval(), (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FcxError(f"ONNX export failed ({type(exc).__name__}: {first}); try without fusing or another opset") from exc
    return exported.model_proto


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    from fcexport.files import write_bytes_atomic

    write_bytes_atomic(stage / ONNX_FILE, onnx_bytes(program, spec, settings.opset))


EXPORTER = Exporter(name="onnx", files=(ONNX_FILE,), format="onnx", write=write, fingerprint=onnx_fingerprint,
                    summary="ONNX (opset >= 17, dynamic batch): onnxruntime, OpenVINO, Triton", describe=describe_onnx)


def exported_layers(program, spec: ModelSpec, compile_onnx) -> tuple:
    """A Predictor's `layers` for a runtime of ONNX files: the program's LayerTap exported to ONNX for the batch at
    hand and run through `compile_onnx(bytes) -> run(x)` (the runtime, as it runs the artifact)."""
    opset = spec.provenance.opset or ExportSettings.opset
    return tapped_layers(program, spec, lambda x: compile_onnx(layer_tap_bytes(program, spec.input_shape, len(x), opset))(x))
