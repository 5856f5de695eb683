"""`fcx`: parse options, call fcexport, render results. No logic lives here.

Heavy modules (torch, onnxruntime) are imported inside each command so `fcx --help` and
`fcx predict` on an ONNX model start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import render
from cli.errors import DEBUG, fail, handle_errors, resolve_hints
from fcexport.errors import FcxError
from fcexport.options import TrainOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Ship small image classifiers: train or import, fold BatchNorm, export TorchScript/ONNX, verify, predict, bench.",
)

TRAIN = TrainOptions()  # one source of truth for defaults
ArtifactsOpt = Annotated[Path, typer.Option("--artifacts", help="Folder for model.pt, model.fused.pt, model.ts, model.onnx, ...")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda")]


@app.callback()
def _global(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    DEBUG["enabled"] = debug


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FcxError(f"{option} expects comma-separated integers, got '{text}'") from None


@app.command()
@handle_errors
def train(
    data: Annotated[str, typer.Option(help="fashion-mnist, mnist, kmnist, digits, FILE.csv or an image folder")] = TRAIN.data,
    data_root: Annotated[Optional[str], typer.Option(help="Where torchvision datasets live [default: $FCX_DATA_ROOT or data/]")] = None,
    model: Annotated[str, typer.Option(help="mlp, cnn (conv stages + MLP head) or softmax (softmax regression)")] = TRAIN.arch,
    hidden: Annotated[Optional[str], typer.Option(help="Hidden layer widths, comma-separated [default: 784,256 for mlp, 128 for cnn]")] = None,
    channels: Annotated[str, typer.Option(help="cnn: output channels of each Conv3x3-BN-ReLU-MaxPool stage")] = ",".join(map(str, TRAIN.channels)),
    bn: Annotated[bool, typer.Option("--bn/--no-bn", help="BatchNorm after each hidden Linear (and each Conv)")] = TRAIN.batchnorm,
    dropout: Annotated[float, typer.Option(help="Dropout after each hidden activation")] = TRAIN.dropout,
    activation: Annotated[str, typer.Option(help="relu, gelu, tanh or sigmoid")] = TRAIN.activation,
    optimizer: Annotated[str, typer.Option(help="sgd, momentum, rmsprop, adam or adamw")] = TRAIN.optimizer,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate [default: per optimizer]")] = None,
    weight_decay: Annotated[float, typer.Option()] = TRAIN.weight_decay,
    epochs: Annotated[int, typer.Option()] = TRAIN.epochs,
    batch_size: Annotated[int, typer.Option()] = TRAIN.batch_size,
    label_smoothing: Annotated[float, typer.Option()] = TRAIN.label_smoothing,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random horizontal flips [default: on for fashion-mnist only]")] = None,
    shift: Annotated[int, typer.Option(help="Random shifts of up to N pixels")] = TRAIN.shift,
    val_split: Annotated[float, typer.Option(help="Share of training images held out for validation")] = TRAIN.val_split,
    folds: Annotated[int, typer.Option(help="K-fold cross-validation (0 = off); keeps the best fold's model")] = TRAIN.folds,
    seed: Annotated[int, typer.Option()] = TRAIN.seed,
    device: DeviceOpt = TRAIN.device,
    artifacts: ArtifactsOpt = Path(TRAIN.artifacts),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final metrics as JSON")] = False,
) -> None:
    """Train a classifier (MLP, CNN or softmax regression) and write model.pt, metrics.json, history.csv, curves.png, confusion.png."""
    from fcexport.pipeline import train as run

    opts = TrainOptions(
        data=data, data_root=data_root, arch=model, hidden=None if hidden is None else _int_list(hidden, "--hidden"),
        channels=_int_list(channels, "--channels"), batchnorm=bn,
        dropout=dropout, activation=activation, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        epochs=epochs, batch_size=batch_size, label_smoothing=label_smoothing, flip=flip, shift=shift,
        val_split=val_split, folds=folds, seed=seed, device=device, artifacts=str(artifacts),
    )
    if quiet or json_out:
        result = run(opts)
    else:
        with render.training_progress(epochs, folds) as on_epoch:
            result = run(opts, on_epoch)
    if json_out:
        render.print_json(result["metrics"])
    elif not quiet:
        render.train_summary(result)
    if result["metrics"]["interrupted"]:
        render.err.print(f"interrupted: kept the best epoch ({result['metrics']['best_epoch']}) in {artifacts}")
        raise typer.Exit(130)


AtolOpt = Annotated[float, typer.Option(help="Absolute tolerance")]
RtolOpt = Annotated[float, typer.Option(help="Relative tolerance")]
DataOpt = Annotated[Optional[str], typer.Option(help="Real data to compare on [default: the checkpoint's dataset, if on disk]")]
DataRootOpt = Annotated[Optional[str], typer.Option(help="Where torchvision datasets live")]
ALL_BACKENDS = "eager,fused,torchscript,onnxruntime,onnxruntime-int8"
BackendsOpt = Annotated[str, typer.Option(help=f"Comma-separated, from: {ALL_BACKENDS}")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON")]


def _checkpoint_arg(checkpoint: Optional[Path], artifacts: Path) -> Path:
    return checkpoint if checkpoint is not None else artifacts / "model.pt"


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FcxError(f"{option} expects one number or comma-separated numbers (one per channel), got '{text}'") from None


@app.command("import")
@handle_errors
def import_(
    weights: Annotated[Path, typer.Argument(help="State dict saved with torch.save(model.state_dict(), ...), or a training checkpoint that nests one")],
    model_def: Annotated[str, typer.Option("--model-def", help="FILE.py:NAME or package.module:NAME: an nn.Module class or factory. This is your own code: it runs once, here")],
    input_shape: Annotated[str, typer.Option("--input-shape", help="C,H,W of one input image, e.g. 1,28,28 or 3,224,224")],
    model_args: Annotated[Optional[str], typer.Option("--model-args", help='Keyword arguments for NAME as a JSON object, e.g. \'{"num_classes": 10}\'')] = None,
    key: Annotated[Optional[str], typer.Option("--key", help="Key of the state dict inside a training checkpoint [default: found automatically]")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Comma-separated names, a text file (one per line), or fashion-mnist, mnist, kmnist, digits [default: 0..N-1]")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Normalisation the model expects on [0, 1] pixels: one value or one per channel")] = None,
    std: Annotated[Optional[str], typer.Option(help="Standard deviation to go with --mean")] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
) -> None:
    """Bring your own model: its weights + code -> ARTIFACTS/model.pt, used by every later command without your code."""
    import json

    from fcexport.pipeline import import_weights
    from fcexport.sources import parse_class_names

    try:
        kwargs = json.loads(model_args) if model_args else {}
    except json.JSONDecodeError as exc:
        raise FcxError(f"--model-args is not valid JSON ({exc.msg}); pass an object such as '{{\"num_classes\": 10}}'") from None
    if not isinstance(kwargs, dict):
        raise FcxError("--model-args must be a JSON object of keyword arguments")
    mean_values, std_values = _floats(mean, "--mean"), _floats(std, "--std")
    if (mean_values is None) != (std_values is None):
        raise FcxError("--mean and --std go together")
    path = import_weights(weights, model_def, input_shape, kwargs, key, parse_class_names(classes), mean_values, std_values, artifacts)
    render.import_summary(path)


@app.command("fuse-bn")
@handle_errors
def fuse_bn(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Model to fuse [default: ARTIFACTS/model.pt]")] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
    out: Annotated[Optional[Path], typer.Option(help="Output [default: ARTIFACTS/model.fused.pt]")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare fused against the original; exit 1 outside tolerance")] = False,
    atol: AtolOpt = 1e-5,
    rtol: RtolOpt = 1e-4,
    device: Annotated[str, typer.Option(help="cpu or cuda (for latency and the fused side of --verify)")] = "cpu",
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    json_out: JsonFlag = False,
) -> None:
    """Fold every BatchNorm (and the input normalisation) into neighbouring Linear/Conv layers: model.fused.pt."""
    from fcexport.compare import Tolerance
    from fcexport.pipeline import fuse

    result = fuse(_checkpoint_arg(checkpoint, artifacts), out or artifacts / "model.fused.pt", verify, Tolerance(atol, rtol),
                  device, data, data_root)
    if json_out:
        render.print_json(result)
    else:
        render.fuse_summary(result)
    if result["verification"] is not None and not result["verification"]["passed"]:
        fail("fused model differs from the original beyond tolerance; nothing was written", 1)


@app.command()
@handle_errors
def export(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Model [default: ARTIFACTS/model.pt]")] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
    format: Annotated[str, typer.Option("--format", help="torchscript, onnx or all")] = "all",
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17)")] = 18,
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="Fold BatchNorm and normalisation first")] = True,
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx: int8 weights, ~2x faster on CPU, approximate")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Write model.ts (frozen TorchScript), model.onnx and manifest.json; inputs are [0, 1] pixels."""
    from fcexport.pipeline import FORMATS, export as run

    if int8 and format == "torchscript":
        raise FcxError("--int8 quantizes model.onnx: add onnx to --format (or use --format all)")
    formats = FORMATS if format == "all" else tuple(_names(format))
    result = run(_checkpoint_arg(checkpoint, artifacts), artifacts, formats, opset, fuse, int8)
    if json_out:
        render.print_json(result)
    else:
        render.export_summary(result)


@app.command()
@handle_errors
def verify(
    artifacts: ArtifactsOpt = Path("artifacts"),
    backends: BackendsOpt = ALL_BACKENDS,
    devices: Annotated[str, typer.Option(help="Comma-separated: cpu, cuda (cuda is skipped when absent)")] = "cpu,cuda",
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    atol: AtolOpt = 1e-5,
    rtol: RtolOpt = 1e-4,
    int8_agreement: Annotated[float, typer.Option(help="int8 model: least share of inputs with the reference's top-1 class")] = 0.99,
    int8_max_drop: Annotated[float, typer.Option(help="int8 model: most accuracy lost vs the reference (0.01 = 1 point)")] = 0.01,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file")] = None,
) -> None:
    """Compare every backend x device against the unfused checkpoint; exit 1 on any failure."""
    from fcexport.compare import Tolerance
    from fcexport.files import write_json_atomic
    from fcexport.pipeline import verify as run

    tolerance = Tolerance(atol, rtol, int8_agreement, int8_max_drop)
    result = run(artifacts, _names(backends), _names(devices), data, data_root, tolerance)
    resolve_hints(result["rows"])
    render.verify_report(result)
    if json_path is not None:
        write_json_atomic(json_path, result)
    if not result["ran"]:
        fail("nothing was verified: every candidate was skipped (see the reasons above)", 1)
    if not result["passed"]:
        fail("verification failed: a candidate differs from the reference or fails its checks (see above)", 1)


@app.command()
@handle_errors
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns")],
    model: Annotated[Optional[Path], typer.Option(help="model.onnx, model.ts, model.fused.pt or model.pt [default: best in ARTIFACTS]")] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
    top_k: Annotated[int, typer.Option(help="Classes to show per image")] = 3,
    invert: Annotated[str, typer.Option(help="auto (light border = light background), yes or no")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    json_out: JsonFlag = False,
) -> None:
    """Classify image files (any size, gray/RGB/RGBA/16-bit, light or dark background)."""
    from rich.markup import escape

    from fcexport.artifacts import find_default_model
    from fcexport.pipeline import stale_reason
    from fcexport.runtimes import open_predictor
    from fcexport.classify import predict_files

    predictor = open_predictor(model if model is not None else find_default_model(artifacts), device)
    stale = stale_reason(predictor.source)
    if stale:
        render.err.print(f"warning: {escape(stale)}; run `fcx export` (and `fcx fuse-bn`) again", highlight=False)
    results = list(predict_files(predictor, images, top_k, invert))  # images stream in batches; results are small
    if json_out:
        render.err.print(f"model: {predictor.source} ({predictor.backend}, {predictor.device})")
        render.print_json(results)
    else:
        render.predictions(predictor, results)


@app.command()
@handle_errors
def bench(
    artifacts: ArtifactsOpt = Path("artifacts"),
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes")] = "1,64,1024",
    backends: BackendsOpt = ALL_BACKENDS,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    warmup: Annotated[int, typer.Option(help="Untimed calls first")] = 20,
    repeat: Annotated[int, typer.Option(help="Timed calls (at most; each batch size also stops after --seconds)")] = 200,
    seconds: Annotated[float, typer.Option(help="Time budget per backend and batch size")] = 1.0,
    json_out: JsonFlag = False,
) -> None:
    """Latency (p50/p90) and throughput per backend and batch size."""
    from fcexport.pipeline import bench as run

    rows = resolve_hints(run(artifacts, _int_list(batch_sizes, "--batch-sizes"), _names(backends), device, warmup, repeat, seconds))
    if json_out:
        render.print_json(rows)
    else:
        render.bench_table(rows)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
