"""Exporter: model.onnx -> model.int8.onnx, int8 weights with per-call activation scales (opt-in, approximate).

No calibration data is needed. The weights shrink 4x (3.3 MB -> 0.8 MB for the default MLP), so
they fit in a core's L2 cache: measured ~2x faster at batch 1 and ~3.5x at batch 1024 on CPU. The
outputs are approximate, so `fcx verify` judges this model by top-1 agreement and accuracy.
Per-tensor, full-range weights: per-channel was slower (21 vs 17 us) for no accuracy gain, and
reduce_range (7-bit, for CPUs without VNNI) doubled the logit error (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from fcexport.onnx_checks import ONNX_FILE, QUANTIZATION_KEY, describe_onnx, onnx_fingerprint
from fcexport.spec import ModelSpec
from fcexport.targets import Exporter, ExportSettings

FILE = "model.int8.onnx"
QUANTIZED_OPS = ("MatMul", "Gemm")
PASSED_ON = ("Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze")
MAX_LAYERS_LEFT_FLOAT = 64  # layers verify remakes the file without, one at a time, to find where the error comes from
# What model.int8.onnx holds, stored in its metadata.
INT8_QUANTIZATION = {
    "method": "onnxruntime dynamic quantization",
    "weights": "int8, per tensor, symmetric (Gemm and MatMul layers)",
    "activations": "uint8, scale computed per call",
    "exact": False,
}


def int8_bytes(onnx_data: bytes, left_float: tuple[str, ...] = ()) -> bytes:
    """Quantize an exported ONNX model (its bytes) to int8 weights with dynamic activation scales; the nodes named in
    `left_float` stay float32 (what verify measures to say which layers carry the int8 error)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="fcx-int8-") as tmp, _without_preprocessing_hint():
        source, target = Path(tmp) / "model.onnx", Path(tmp) / FILE
        source.write_bytes(onnx_data)
        # Gemm/MatMul only: ORT's ConvInteger made a CNN 4.8x slower than float32 (318 vs 66 us, measured)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=False, reduce_range=False,
                         op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=list(left_float))
        proto = onnx.load(str(target))
    proto.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(INT8_QUANTIZATION))
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def left_float(program, spec: ModelSpec, compile_onnx):
    """An approximate Predictor's `left_float`: () -> {layer: run(x) of model.int8.onnx remade with that layer's
    Gemm / MatMul nodes left float32, through `compile_onnx(bytes) -> run` as the row runs the file}, for up to
    MAX_LAYERS_LEFT_FLOAT layers the user wrote: the layers whose absence removes most of the error carry it."""
    import onnx

    from fcexport.program import refs_in
    from fcexport.targets.onnx import onnx_bytes

    def remade():
        data = onnx_bytes(program, spec, spec.provenance.opset or ExportSettings.opset)  # the model.onnx verify matched
        layer_of = {ref.name: node.layer for node in program.nodes for ref in refs_in(node.args) if ref.name in program.tensors and node.layer}
        nodes: dict[str, list[str]] = {}
        for node in onnx.load_from_string(data).graph.node:
            found = [layer_of[name] for name in node.input if name in layer_of]
            if node.op_type in PASSED_ON and found:  # a weight transposed or reshaped on its way to a MatMul
                layer_of[node.output[0]] = found[0]
            elif node.op_type in QUANTIZED_OPS and found:  # the quantizer renames a Gemm it splits into MatMul + Add
                nodes.setdefault(found[0], []).extend([node.name, f"{node.name}_MatMul"])
        return {layer: compile_onnx(int8_bytes(data, tuple(names))) for layer, names in list(nodes.items())[:MAX_LAYERS_LEFT_FLOAT]}

    return remade


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    from fcexport.files import write_bytes_atomic

    write_bytes_atomic(stage / FILE, int8_bytes((stage / ONNX_FILE).read_bytes()))


@contextlib.contextmanager
def _without_preprocessing_hint():
    """The quantizer suggests shape-inference pre-processing on the root logger; a chain of Gemms
    has nothing for it to do, so the hint is kept out of our output."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


EXPORTER = Exporter(name="int8", files=(FILE,), format="onnx", write=write, fingerprint=onnx_fingerprint,
                    summary="int8 ONNX from model.onnx (approximate, CPU, ~2x faster)", builds_on="onnx",
                    by_default=False, approximate=True, devices=("cpu",), describe=describe_onnx)
