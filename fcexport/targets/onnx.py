"""Exporter: a program -> model.onnx (dynamic batch, named input/output, spec in metadata_props, fully checked).

Exported models take float32 pixels in [0, 1] of shape (N, C, H, W) and return logits.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.onnx_checks import (INPUT_NAME, MAX_ONNX_BYTES, ONNX_FILE, OUTPUT_NAME, check_onnx_model, describe_onnx, onnx_fingerprint,
                                  strip_documentation)
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
    proto = _exported(ProgramModule(program, every_output=True), example, ({0: torch.export.Dim("batch")},), opset,
                      [OUTPUT_NAME, *(name for name, _ in program.extras)])
    proto.doc_string = ("fcexport segmentation model: float32 pixels in [0, 1] (N, C, H, W) -> per-pixel logits (N, classes, H, W)"
                        if spec.dense else "fcexport classifier: float32 pixels in [0, 1] (N, C, H, W) -> logits (N, classes)")
    del proto.metadata_props[:]
    for key, value in spec.to_dict().items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    size = proto.ByteSize()
    if size > MAX_ONNX_BYTES:  # over protobuf's limit it cannot be serialised: vit_h_14, regnet_y_128gf
        raise FcxError(f"model.onnx would take {size:,} bytes, over the {MAX_ONNX_BYTES:,} of one ONNX file "
                       "(fcexport writes no external data); export torchscript or pt2")
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def layer_tap_bytes(program, input_shape, batch: int, opset: int = ExportSettings.opset) -> bytes:
    """The same export of fcexport.program.LayerTap (every layer's output besides the logits, in one tensor) for a
    fixed batch: the copy verify runs through a failing row's runtime to find the layer where it broke."""
    import torch

    from fcexport.program import LayerTap

    return _exported(LayerTap(program), torch.rand(batch, *input_shape), None, opset, [OUTPUT_NAME]).SerializeToString()


def _exported(module, example, dynamic_shapes, opset: int, output_names: list[str]):
    import torch

    try:
        # torch.onnx and onnxscript print progress, and log notes about opset conversion on every call
        with quiet_warnings(), quiet_loggers("torch.onnx", "onnxscript", "onnx_ir"), contextlib.redirect_stdout(io.StringIO()):
            exported = torch.onnx.export(
                module.eval(), (example,), dynamo=True, input_names=[INPUT_NAME], output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FcxError(f"ONNX export failed ({type(exc).__name__}: {first}); try without fusing or another opset") from exc
    _unclash(exported.model.graph)
    proto = exported.model_proto
    strip_documentation(proto.graph)  # the same file wherever fcexport is installed (no source paths or lines)
    for function in proto.functions:
        strip_documentation(function)
    _halve_last(proto.graph)
    return proto


def _unclash(graph) -> None:
    """The outputs are named by the model ("aux"); an internal value the exporter named alike (a dict key "relu" or
    "convolution" is also an op's name) is renamed, so every name in the file stays unique (ONNX's SSA rule)."""
    returned = {id(value) for value in graph.outputs}
    names = {value.name for value in graph.outputs}
    values = [*graph.inputs, *(value for node in graph for value in node.outputs)]
    taken = {value.name for value in values} | set(graph.initializers)

    def fresh(name: str) -> str:
        found, i = f"{name}_value", 1
        while found in taken:
            found, i = f"{name}_value{i}", i + 1
        taken.add(found)
        return found

    for value in values:
        if id(value) not in returned and value.name in names:
            value.name = fresh(value.name)
    for name in names & set(graph.initializers):  # a stored tensor named like an output: renamed the same way
        value = graph.initializers.pop(name)
        value.name = fresh(name)
        graph.initializers[value.name] = value


def _halve_last(graph) -> None:
    """Below opset 20 the exporter writes GELU as x * (0.5 * (1 + erf(x / sqrt 2))); onnxruntime fuses it into one Gelu
    kernel only as (x * (1 + erf(x / sqrt 2))) * 0.5, so the two Muls trade places (halving is exact in float32: the
    same numbers). Measured: convnext_tiny's model.onnx at batch 64 ran at 0.82x a plain export's at opset 20."""
    import numpy as np
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.dims or list(t.dims) == [1]}

    def is_constant(name: str, value: float) -> bool:
        return name in constants and constants[name].size == 1 and np.float32(constants[name].ravel()[0]) == np.float32(value)

    made_by = {output: node for node in graph.node for output in node.output}

    def made(name: str, op: str):
        node = made_by.get(name)
        return node if node is not None and node.op_type == op else None

    uses: dict[str, int] = {}
    for name in (*(i for node in graph.node for i in node.input), *(o.name for o in graph.output)):  # a returned value is used
        uses[name] = uses.get(name, 0) + 1
    for outer in graph.node:
        if outer.op_type != "Mul" or len(outer.input) != 2:
            continue
        x, inner_out = outer.input if made(outer.input[1], "Mul") else reversed(outer.input)
        inner = made(inner_out, "Mul")
        half = next((i for i in (0, 1) if is_constant(inner.input[i], 0.5)), None) if inner and uses[inner_out] == 1 else None
        add = made(inner.input[1 - half], "Add") if half is not None else None
        erf = next((made(i, "Erf") for i in add.input if made(i, "Erf")), None) if add and len(add.input) == 2 else None
        div = made(erf.input[0], "Div") if erf else None
        if not (div and div.input[0] == x and is_constant(div.input[1], 2 ** 0.5) and any(is_constant(i, 1.0) for i in add.input)):
            continue
        halving = inner.input[half]
        inner.input[:] = [x, add.output[0]]
        outer.input[:] = [inner_out, halving]


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    """model.onnx, only where fcexport would load it: a file its own bounds refuse (torch's exporter can widen what the
    program bounds, e.g. broadcast index_put indices into a Concat) is never published. The check's result is cached,
    so the loads that follow (export's own check, verify) do not repeat it."""
    from fcexport.files import write_bytes_atomic

    data = onnx_bytes(program, spec, settings.opset)
    try:
        check_onnx_model(data, Path(ONNX_FILE))
    except FcxError as exc:
        raise FcxError(f"the ONNX file torch exports is one fcexport would refuse to load ({exc}); export another format") from exc
    write_bytes_atomic(stage / ONNX_FILE, data)


EXPORTER = Exporter(name="onnx", files=(ONNX_FILE,), format="onnx", write=write, fingerprint=onnx_fingerprint,
                    summary="ONNX (opset >= 17, dynamic batch): onnxruntime, OpenVINO, Triton", describe=describe_onnx)


def exported_layers(program, spec: ModelSpec, compile_onnx) -> tuple:
    """A Predictor's `layers` for a runtime of ONNX files: the program's LayerTap exported to ONNX for the batch at
    hand and run through `compile_onnx(bytes) -> run(x)` (the runtime, as it runs the artifact)."""
    opset = spec.provenance.opset or ExportSettings.opset
    return tapped_layers(program, spec, lambda x: compile_onnx(layer_tap_bytes(program, spec.input_shape, len(x), opset))(x))
