"""Exporter: model.onnx -> model.int8-static.onnx, int8 weights and activations with scales calibrated on real images
(QDQ: QuantizeLinear / DequantizeLinear around each Conv, Gemm and MatMul, and the pooling, ReLU and residual Add
between them; opt-in, approximate).

Where dynamic int8 (fcexport.targets.int8) quantises only Gemm/MatMul and pays nothing on conv nets, static int8
runs every convolution in int8. Measured at batch 64 against model.onnx in float32 on this 2-core AVX-512 VNNI CPU
(benchmarks/RESULTS.md): resnet18 2.7x in onnxruntime (2.1x with only Conv, Gemm and MatMul quantised), the
Fashion-MNIST CNN 1.4x (0.63x: a float MaxPool and ReLU between int8 convolutions cost a dequantise and a
quantise each). OpenVINO reads the same QDQ file and runs it with its own int8 kernels.
Calibration: CALIBRATION_IMAGES images of the folder the user names (prepared as fcx predict prepares them), else of
the model's own dataset's training split (never its test split, which verify judges accuracy on). Weights are
per-channel symmetric int8, computed from the weights alone; activation scales come from the calibration images'
ranges (MinMax). Only the activation scales depend on the images, so verify compares everything else with a fresh
export made on any inputs (onnx_checks.onnx_fingerprint leaves calibrated scales out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fcexport.errors import FcxError
from fcexport.onnx_checks import ONNX_FILE, QUANTIZATION_KEY, describe_onnx, onnx_fingerprint
from fcexport.spec import ModelSpec
from fcexport.targets import RANDOM_CALIBRATION, Exporter, ExportSettings

FILE = "model.int8-static.onnx"
CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 16
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "MaxPool", "Relu", "Add", "GlobalAveragePool")


def calibration_inputs(spec: ModelSpec, calibration) -> tuple[np.ndarray, str]:
    """(up to CALIBRATION_IMAGES prepared images, where they came from)."""
    if calibration == RANDOM_CALIBRATION:  # verify's fresh export: only the structure is compared
        return np.random.default_rng(0).random((CALIBRATION_BATCH, *spec.input_shape), dtype=np.float32), calibration
    if calibration is not None:
        import itertools

        from fcexport.preprocess import collect_image_files, prepare_image

        files = list(itertools.islice(collect_image_files([str(calibration)]), CALIBRATION_IMAGES))
        if not files:
            raise FcxError(f"{calibration}: no images to calibrate int8-static with; name a folder of the model's kind of images")
        images = np.stack([prepare_image(f, spec.input_shape, spec.preprocess) for f in files]).astype(np.float32)
        return images, f"{len(files)} images of {calibration}"
    dataset = spec.dataset or {}
    if not dataset.get("source"):
        raise FcxError("int8-static needs calibration images: name a folder of them with --calibration DIR "
                       "(the model records no dataset of its own)")
    from fcexport.data import load_dataset

    train = load_dataset(dataset["source"], dataset.get("root"), image_size=spec.input_shape[-1], download=False).train
    picked = np.random.default_rng(0).permutation(len(train))[:CALIBRATION_IMAGES]
    return train.images[picked].numpy().astype(np.float32), f"{len(picked)} training images of {dataset['source']}"


def int8_static_bytes(onnx_data: bytes, x: np.ndarray, source: str) -> bytes:
    """Quantise an exported ONNX model (its bytes) to QDQ int8, calibrated on `x`."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from fcexport.targets.int8 import _without_preprocessing_hint

    name = onnx.load_from_string(onnx_data).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter({name: x[i : i + CALIBRATION_BATCH]} for i in range(0, len(x), CALIBRATION_BATCH))

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="fcx-int8-static-") as tmp, _without_preprocessing_hint():
        src, target = Path(tmp) / "model.onnx", Path(tmp) / FILE
        src.write_bytes(onnx_data)
        # reduce_range: weights in 7 bits, so x86 CPUs without VNNI (AVX2: pmaddubsw sums two u8 x s8 products in 16
        # bits) never saturate; with 8 bits the course CNN agreed with float64 on 95% of decisive inputs there
        quantize_static(src, target, Batches(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS), extra_options={"QuantizeBias": False})
        proto = onnx.load(str(target))
    described = {"method": "onnxruntime static quantization (QDQ)", "weights": "int8 in a 7-bit range, per channel, symmetric",
                 "activations": "uint8, scales calibrated (MinMax)", "calibration": source, "exact": False}
    proto.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(described))
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    from fcexport.files import write_bytes_atomic

    x, source = calibration_inputs(spec, settings.calibration)
    write_bytes_atomic(stage / FILE, int8_static_bytes((stage / ONNX_FILE).read_bytes(), x, source))


EXPORTER = Exporter(name="int8-static", files=(FILE,), format="onnx", write=write, fingerprint=onnx_fingerprint,
                    summary="int8 QDQ ONNX from model.onnx, calibrated on real images (approximate, CPU, 1.4-2.7x on conv nets)",
                    builds_on="onnx", by_default=False, approximate=True, devices=("cpu",), describe=describe_onnx)
