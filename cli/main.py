"""`fcx`: parse options, call fcexport.pipeline, render results. No logic lives here.

Heavy modules (torch, onnxruntime, and rich's tables in cli.render) are imported inside each command so
`fcx --help` and `fcx predict` on an ONNX model start fast (predict prints plain lines: cli.lines).
"""

import importlib.util
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import lines
from cli.errors import DEBUG, fail, handle_errors
from cli.helpformat import PlainHelp
from cli.hints import json_with_commands
from fcexport import __version__, registry
from fcexport.errors import FcxError
from fcexport.options import TrainOptions
from fcexport.remote import COMMAND_TIMEOUT_SECONDS, TIMEOUT_SECONDS
from fcexport.targets import TritonSettings

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help (cli.helpformat): examples keep their layout
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Ship small image classifiers: train or import a model, fold BatchNorm, export TorchScript/ONNX, "
    "verify every artifact, predict on image files, benchmark.",
    epilog="\b\nStart with `fcx train --data digits` (offline), or `fcx import` for your own\n"
    "model. Every command reads and writes ./artifacts unless --artifacts says so.",
)


def examples(*lines: str) -> str:
    """A help epilog that click prints as written (the \\b stops it re-flowing the lines)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


TRAIN = TrainOptions()  # one source of truth for defaults
ArtifactsOpt = Annotated[Path, typer.Option("--artifacts", help="Folder for model.pt, model.fused.pt, model.ts, model.onnx, ...")]
DataRootHelp = "Where torchvision datasets live [default: $FCX_DATA_ROOT, else data/]"
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout instead of tables")]
JsonFileOpt = Annotated[Optional[Path], typer.Option("--json-file", help="Also write the result as JSON to this file")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no tables: errors, and the exit code, only")]
SignKeyOpt = Annotated[Optional[Path], typer.Option("--sign-key", help="Sign the folder with this elliptic-curve private key (PEM): model.sig")]
InputsOpt = Annotated[Optional[int], typer.Option("--inputs", help="Compare on this many inputs (8-4096), the same ones every run [default: up to 2,000 test images + 256 random + up to 256 first-layer probes, the same on every machine]")]
WideFlag = Annotated[bool, typer.Option("--wide", help="Show every column (mean and p99 error, max relative error)")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fcx (fcexport) {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors (the exit code stays the same).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    DEBUG["enabled"] = debug
    lines.show_library_warnings()


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FcxError(f"{option} expects comma-separated integers, got '{text}'") from None


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FcxError(f"{option} expects one number or comma-separated numbers (one per channel), got '{text}'") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _backends(text: str, everything=None) -> list[str]:
    """--backends: names, where `all` is `everything` (by default every registered backend)."""
    everything = tuple(registry.backends()) if everything is None else everything
    return [b for name in _names(text) for b in (everything if name == "all" else [name])]


def _check_timeout(timeout: Optional[float], url) -> None:
    """--timeout bounds the talk with a server: it goes with --url and is a positive, finite number of seconds."""
    if timeout is None:
        return
    if not url:
        raise FcxError("--timeout bounds the time spent with a server and goes with --url")
    if not 0 < timeout < float("inf"):
        raise FcxError(f"--timeout takes a positive number of seconds, got {timeout:g}")


def _emit_json(obj, json_out: bool, json_file: Optional[Path]) -> None:
    if json_file is not None:
        lines.save_json(obj, json_file)
    if json_out:
        lines.print_json(obj)


@app.command(cls=PlainHelp, epilog=examples(
    "fcx train --data-root ../shared/data      # Fashion-MNIST, MLP-BN",
    "fcx train --data digits --epochs 15       # offline: scikit-learn's digits",
    "fcx train --model cnn --data-root ../shared/data",
    "fcx train --data train.csv --test-data test.csv --classes fashion-mnist",
    "fcx train --hidden 512,128 --no-bn --dropout 0.2 --folds 5 --json",
))
@handle_errors
def train(
    data: Annotated[str, typer.Option(help="fashion-mnist, mnist, kmnist, digits, FILE.csv or an image folder")] = TRAIN.data,
    data_root: Annotated[Optional[str], typer.Option(help=DataRootHelp)] = None,
    test_data: Annotated[Optional[str], typer.Option(help="CSV or image folder to test on (for --data FILE.csv or DIR) [default: hold out 20%]")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Class names for CSV labels 0..N-1: comma-separated, a text file, or a known set")] = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="CSV: the label column, by number (1 = first) or header name [default: the first]")] = None,
    model: Annotated[str, typer.Option(help="mlp, cnn (conv stages + MLP head) or softmax (softmax regression)")] = TRAIN.arch,
    hidden: Annotated[Optional[str], typer.Option(help="Hidden layer widths, comma-separated [default: 784,256 for mlp, 128 for cnn]")] = None,
    channels: Annotated[str, typer.Option(help="cnn: output channels of each Conv3x3-BN-ReLU-MaxPool stage")] = ",".join(map(str, TRAIN.channels)),
    bn: Annotated[bool, typer.Option("--bn/--no-bn", help="BatchNorm after each hidden Linear (and each Conv)")] = TRAIN.batchnorm,
    dropout: Annotated[float, typer.Option(help="Dropout after each hidden activation")] = TRAIN.dropout,
    activation: Annotated[str, typer.Option(help="relu, gelu, tanh or sigmoid")] = TRAIN.activation,
    optimizer: Annotated[str, typer.Option(help="sgd, momentum, rmsprop, adam or adamw")] = TRAIN.optimizer,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of the one-cycle schedule [default: 0.1 sgd, 0.05 momentum, 1e-3 rmsprop, 2e-3 adam/adamw]")] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay")] = TRAIN.weight_decay,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training images; the best epoch is kept [default: 60, cnn 20]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per training step [default: 256, cnn 128]")] = None,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy loss")] = TRAIN.label_smoothing,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random horizontal flips [default: on for fashion-mnist only]")] = None,
    shift: Annotated[int, typer.Option(help="Random shifts of up to N pixels")] = TRAIN.shift,
    val_split: Annotated[float, typer.Option(help="Share of training images held out for validation")] = TRAIN.val_split,
    folds: Annotated[int, typer.Option(help="K-fold cross-validation (0 = off); keeps the best fold's model")] = TRAIN.folds,
    seed: Annotated[int, typer.Option(help="Seed for splits, initialisation and augmentation")] = TRAIN.seed,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = TRAIN.device,
    artifacts: ArtifactsOpt = Path(TRAIN.artifacts),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final metrics as JSON")] = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Train a classifier (MLP, CNN or softmax regression).

    Writes model.pt, metrics.json, history.csv, curves.png and confusion.png."""
    from cli import render
    from fcexport.pipeline import train as run
    from fcexport.sources import parse_class_names

    opts = TrainOptions(
        data=data, data_root=data_root, test_data=test_data, class_names=parse_class_names(classes), label_column=label_column, arch=model,
        hidden=None if hidden is None else _int_list(hidden, "--hidden"), channels=_int_list(channels, "--channels"),
        batchnorm=bn, dropout=dropout, activation=activation, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        epochs=epochs, batch_size=batch_size, label_smoothing=label_smoothing, flip=flip, shift=shift,
        val_split=val_split, folds=folds, seed=seed, device=device, artifacts=str(artifacts),
    )
    if quiet or json_out:
        result = run(opts)
    else:
        with render.training_progress(opts.with_arch_defaults().epochs, folds) as on_epoch:
            result = run(opts, on_epoch)
    _emit_json(result["metrics"], json_out, json_file)
    if not (quiet or json_out):
        render.train_summary(result)
    if result["metrics"]["interrupted"]:
        render.err.print(f"interrupted: kept the best epoch ({result['metrics']['best_epoch']}) in {artifacts}")
        raise typer.Exit(130)


@app.command("import", cls=PlainHelp, epilog=examples(
    "fcx import course.pt --model-def course_model.py:course_mlp \\",
    "    --input-shape 1,28,28 --classes fashion-mnist --mean 0.2855 --std 0.3536",
    "fcx import resnet18.pt --model-def torchvision.models:resnet18 \\",
    "    --model-args '{\"num_classes\": 10}' --input-shape 3,224,224 \\",
    "    --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225",
    "fcx import ckpt.pt --key model_state_dict --model-def nets.py:Net \\",
    "    --input-shape 1,28,28",
    "fcx import my-vit/      # a Hugging Face folder: config.json + weights",
))
@handle_errors
def import_(
    weights: Annotated[Path, typer.Argument(metavar="WEIGHTS", help="State dict (torch.save of model.state_dict(), a checkpoint nesting one, or .safetensors), or a Hugging Face model folder (save_pretrained)")],
    model_def: Annotated[Optional[str], typer.Option("--model-def", help="FILE.py:NAME, package.module:NAME or timm:NAME: an nn.Module class or factory. This is your own code: it runs once, here [a folder: its config.json's class]")] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="C,H,W of one input image, e.g. 1,28,28 or 3,224,224 [the model's own where it says it: timm, a folder]")] = None,
    model_args: Annotated[Optional[str], typer.Option("--model-args", help='Keyword arguments for NAME as a JSON object, e.g. \'{"num_classes": 10}\'')] = None,
    key: Annotated[Optional[str], typer.Option("--key", help="Key of the state dict inside a training checkpoint [default: found automatically]")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Comma-separated names, a text file (one per line), or fashion-mnist, mnist, kmnist, digits [default: 0..N-1]")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Normalisation the model expects on [0, 1] pixels: one value or one per channel")] = None,
    std: Annotated[Optional[str], typer.Option(help="Standard deviation to go with --mean")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Of several outputs (a dict, a tuple), the one to keep, e.g. out [default: out, logits, else the first]")] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
) -> None:
    """Bring your own model: its weights and code -> model.pt.

    Every later command then uses ARTIFACTS/model.pt without your code."""
    import json

    from cli import render
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
    if weights.is_dir() and model_def is None:
        from fcexport.pipeline import import_pretrained
        from fcexport.sources import parse_input_shape

        shape = parse_input_shape(input_shape) if input_shape is not None else None
        with render.steps("import") as on_step:
            path = import_pretrained(weights, artifacts, shape, parse_class_names(classes), mean_values, std_values, on_step)
    elif model_def is None:
        raise FcxError(f"{weights}: a weights file needs --model-def (and --input-shape unless the model says its own, "
                       "as timm models do); a Hugging Face model folder needs neither")
    else:
        with render.steps("import") as on_step:
            path = import_weights(weights, model_def, input_shape, kwargs, key, parse_class_names(classes), mean_values,
                                  std_values, artifacts, on_step, output)
    render.import_summary(path)


AtolOpt = Annotated[Optional[float], typer.Option(help="Absolute tolerance per element (with --rtol: replaces the noise rule)")]
RtolOpt = Annotated[Optional[float], typer.Option(help="Relative tolerance per element (with --atol: replaces the noise rule)")]
NoiseOpt = Annotated[float, typer.Option("--noise-factor", help="Pass when the max error vs model.pt in float64 is at most this many times model.pt's own float32 error")]
DataOpt = Annotated[Optional[str], typer.Option(help="Real test images to compare on: any --data of fcx train [default: the model's dataset, if on disk]")]
ALL_BACKENDS = ", ".join(registry.backends())  # spaced, so help wraps between names, never inside one
BackendsOpt = Annotated[str, typer.Option(help=f"Comma-separated, from: {ALL_BACKENDS}; all = every one")]
LOWER = ", ".join(b for b in registry.backends() if b not in registry.verified_by_default())
VerifyBackendsOpt = Annotated[str, typer.Option("--backends", help=f"Comma-separated, from: {ALL_BACKENDS}; all = every one "
                                                f"but {LOWER} (nobody exported for it: name it to judge it)")]
FORMATS_HELP = (f"Comma-separated, from: {', '.join(registry.exporters())}; all = {','.join(registry.default_exporters())}")


UrlOpt = Annotated[Optional[list[str]], typer.Option("--url", metavar="URL", help="Verify a served model instead (KServe v2: http://HOST:PORT or grpc://HOST:PORT; repeat for both)")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", metavar="SECONDS", help=(
    f"With --url: the most the whole command may take with the server; each request also ends within "
    f"{TIMEOUT_SECONDS:g} s [default: {COMMAND_TIMEOUT_SECONDS:g}]"))]
ServedModelOpt = Annotated[Optional[str], typer.Option("--model", help="With --url: the served model's name [default: the one the server serves]")]


def _model_arg(model: Optional[Path], artifacts: Path) -> Path:
    return model if model is not None else artifacts / registry.MODEL


@app.command("fuse-bn", cls=PlainHelp, epilog=examples(
    "fcx fuse-bn --verify        # artifacts/model.pt -> model.fused.pt",
    "fcx fuse-bn other.pt --out other.fused.pt --noise-factor 4 --verify",
    "fcx fuse-bn --verify --data fashion-mnist --data-root ../shared/data --json",
))
@handle_errors
def fuse_bn(
    checkpoint: Annotated[Optional[Path], typer.Argument(metavar="MODEL", help="Model to fuse [default: ARTIFACTS/model.pt]")] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
    out: Annotated[Optional[Path], typer.Option(help="Output [default: ARTIFACTS/model.fused.pt]")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare fused against the original first; exit 1 (and write nothing) outside tolerance")] = False,
    noise_factor: NoiseOpt = 4.0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (for latency and the fused side of --verify)")] = "cpu",
    data: DataOpt = None,
    data_root: Annotated[Optional[str], typer.Option(help=DataRootHelp)] = None,
    inputs: InputsOpt = None,
    wide: WideFlag = False,
    quiet: QuietFlag = False,
    json_out: JsonFlag = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Fold every BatchNorm exactly: model.fused.pt.

    The input normalisation folds too where that is exact (a Linear, a Conv without padding)."""
    from cli import render
    from fcexport.compare import Tolerance
    from fcexport.pipeline import fuse

    with render.steps("fuse-bn", not (quiet or json_out)) as on_step:
        result = fuse(_model_arg(checkpoint, artifacts), out or artifacts / registry.FUSED, verify, Tolerance(noise_factor, atol, rtol),
                      device, data, data_root, on_step, inputs)
    _emit_json(json_with_commands(result.to_json()), json_out, json_file)
    if not (json_out or quiet):
        render.fuse_summary(result, wide)
    if not result.written:
        fail("fused model differs from the original beyond tolerance; nothing was written", 1)


@app.command(cls=PlainHelp, short_help="Write model.ts, model.onnx, model.pt2 and manifest.json.", epilog=examples(
    "fcx export                  # model.ts, model.onnx, model.pt2, manifest.json",
    "fcx export --format onnx --opset 18",
    "fcx export --format all,int8    # the same as --int8",
    "fcx export --int8           # also model.int8.onnx (approximate, CPU)",
    "fcx export --format all,int8-static --calibration imgs/  # int8 convs",
    "fcx export --sign-key key.pem   # + model.sig (fcx verify --public-key)",
    "fcx export --triton --name digits   # + model_repository/ (fcx serve)",
    "fcx export --no-check -q    # no self-check, no output",
))
@handle_errors
def export(
    checkpoint: Annotated[Optional[Path], typer.Argument(metavar="MODEL", help="Model [default: ARTIFACTS/model.pt]")] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
    format: Annotated[str, typer.Option("--format", help=FORMATS_HELP)] = "all",
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17)")] = 18,
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="Fold BatchNorm and normalisation first")] = True,
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx: int8 weights, ~2x faster on CPU, approximate")] = False,
    triton: Annotated[bool, typer.Option("--triton", help="Also write model_repository/ for Triton Inference Server (fcx serve)")] = False,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="int8-static: a folder of images to calibrate on [default: the model's own training images]")] = None,
    name: Annotated[str, typer.Option("--name", help="Triton: the served model's name")] = TritonSettings.name,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Triton: the largest batch a request (or the dynamic batcher) makes")] = TritonSettings.max_batch_size,
    instances: Annotated[int, typer.Option("--instances", help="Triton: copies of the model running side by side")] = TritonSettings.instances,
    gpu: Annotated[bool, typer.Option("--gpu", help="Triton: run the instances on GPUs (KIND_GPU)")] = False,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Run each written file on a few inputs against model.pt (fcx verify is the full proof)")] = True,
    sign_key: SignKeyOpt = None,
    quiet: QuietFlag = False,
    json_out: JsonFlag = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Write model.ts (TorchScript), model.onnx, model.pt2 (torch.export) and manifest.json [and model.sig].

    Each takes float32 pixels in [0, 1], shape (N, C, H, W), and returns logits. The manifest's sha256 is
    printed: `fcx verify --expect-digest` checks a copy of the folder against it."""
    from cli import render
    from fcexport.pipeline import export as run

    formats = [f for item in _names(format) for f in (registry.default_exporters() if item == "all" else [item])]
    formats += [f for f, wanted in (("int8", int8), ("triton", triton)) if wanted]
    chosen = TritonSettings(name, max_batch_size, instances, gpu)
    if "triton" not in formats and chosen != TritonSettings():
        raise FcxError("--name, --max-batch-size, --instances and --gpu describe the Triton repository: add --triton")
    if calibration is not None and "int8-static" not in formats:
        raise FcxError("--calibration is for the int8-static model: add --format all,int8-static")
    with render.steps("export", not (quiet or json_out)) as on_step:
        result = run(_model_arg(checkpoint, artifacts), artifacts, formats, opset, fuse, sign_key, chosen, check, on_step,
                     calibration=None if calibration is None else str(calibration))
    _emit_json(json_with_commands(result.to_json()), json_out, json_file)
    if not (json_out or quiet):
        render.export_summary(result)
    if not result.passed:
        failed = ", ".join(r.backend for r in result.check.rows if r.status.value == "fail")
        fail(f"the export check failed ({failed}): a written file does not compute what model.pt does; "
             f"see `fcx verify --artifacts {artifacts}` for the full report", 1)


@app.command(cls=PlainHelp, short_help="Sign an exported folder (OpenSSF Model Signing).", epilog=examples(
    "openssl ecparam -name prime256v1 -genkey -noout -out key.pem   # a key",
    "openssl ec -in key.pem -pubout -out key.pub",
    "fcx sign --key key.pem      # artifacts/model.sig",
    "fcx verify --public-key key.pub",
))
@handle_errors
def sign(
    key: Annotated[Path, typer.Option("--key", help="Elliptic-curve private key (PEM) to sign with")],
    artifacts: ArtifactsOpt = Path("artifacts"),
    signature: Annotated[Optional[Path], typer.Option(help="Where to write the signature [default: ARTIFACTS/model.sig]")] = None,
    json_out: JsonFlag = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Sign an exported folder (OpenSSF Model Signing): every file in it, as it is now.

    Its files must match its manifest. Adding, removing or changing any file afterwards fails
    `fcx verify --public-key`."""
    from cli import render
    from fcexport.pipeline import sign as run

    result = run(artifacts, key, signature)
    _emit_json(result, json_out, json_file)
    if not json_out:
        render.sign_summary(result)


@app.command(cls=PlainHelp, epilog=examples(
    "fcx verify                  # every backend x device against model.pt",
    "fcx verify --backends onnxruntime --devices cpu --json-file report.json",
    "fcx verify --data fashion-mnist --data-root ../shared/data --wide",
    "fcx verify --public-key key.pub   # the folder is exactly what was signed",
    "fcx verify --expect-digest SHA    # the manifest fcx export printed",
))
@handle_errors
def verify(
    artifacts: ArtifactsOpt = Path("artifacts"),
    backends: VerifyBackendsOpt = "all",
    devices: Annotated[str, typer.Option(help="Comma-separated: cpu, cuda (cuda is skipped when absent)")] = "cpu,cuda",
    data: DataOpt = None,
    data_root: Annotated[Optional[str], typer.Option(help=DataRootHelp)] = None,
    noise_factor: NoiseOpt = 4.0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    int8_agreement: Annotated[float, typer.Option(help="int8 model: least share of inputs with the reference's top-1 class")] = 0.99,
    int8_max_drop: Annotated[float, typer.Option(help="int8 model: most accuracy lost vs the reference (0.01 = 1 point)")] = 0.01,
    public_key: Annotated[Optional[Path], typer.Option("--public-key", help="Check the folder against its signature first (PEM public key)")] = None,
    signature: Annotated[Optional[Path], typer.Option(help="The signature to check [default: ARTIFACTS/model.sig]")] = None,
    expect_digest: Annotated[Optional[str], typer.Option("--expect-digest", help="Check that manifest.json has this sha256 (printed by fcx export) and that every file matches it")] = None,
    url: UrlOpt = None,
    served_model: ServedModelOpt = None,
    timeout: TimeoutOpt = None,
    inputs: InputsOpt = None,
    reference: Annotated[bool, typer.Option("--reference", help="Judge the ONNX files against reference.npz, the float64 answers export stored (no model.pt or torch needed; no structure check); automatic where torch is not installed")] = False,
    wide: WideFlag = False,
    quiet: QuietFlag = False,
    json_out: JsonFlag = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Prove each artifact computes what model.pt does.

    Checks the signature or digest (given one), integrity (manifest.json), structure (a fresh export's
    ops, weights and spec) and numbers (real and random inputs). Nothing is loaded before its checks pass."""
    from cli import render
    from fcexport.compare import Tolerance
    from fcexport.pipeline import verify as run

    if signature is not None and public_key is None:
        raise FcxError("--signature needs --public-key: the key the signature is checked with")
    tolerance = Tolerance(noise_factor, atol, rtol, int8_agreement, int8_max_drop)
    from fcexport.pipeline import verify_remote

    if url and (public_key or expect_digest or backends != "all"):
        raise FcxError("--url verifies a served model; --public-key, --expect-digest and --backends check files: run them without --url")
    if not url and served_model is not None:
        raise FcxError("--model names a served model and goes with --url; fcx verify checks every file of --artifacts")
    _check_timeout(timeout, url)
    with render.steps("verify", not (quiet or json_out)) as on_step:
        if url:
            result = verify_remote(url, served_model, artifacts, data, data_root, tolerance, on_step, inputs, timeout)
        elif reference or importlib.util.find_spec("torch") is None:
            from fcexport.pipeline import verify_with_reference

            result = verify_with_reference(artifacts, _backends(backends, registry.verified_by_default()), _names(devices),
                                           tolerance, public_key, signature, expect_digest, on_step)
        else:
            result = run(artifacts, _backends(backends, registry.verified_by_default()), _names(devices), data, data_root, tolerance, public_key, signature,
                         expect_digest, on_step, inputs)
    _emit_json(json_with_commands(result.to_json()), json_out, json_file)
    if not (json_out or quiet):
        render.verify_report(result, wide, artifacts)
    failed, shown = result.trust_failed, not (quiet or json_out)
    if failed:
        detail = "" if shown else ": " + next(c.detail for c in result.trust if c.check == failed[0])  # no table said it
        fail(f"the folder is not what was {'signed' if 'signature' in failed else 'exported'} ({', '.join(failed)} check failed"
             f"{detail}); nothing in it was loaded", 1)
    if not result.ran:
        fail(f"nothing was verified: every candidate was skipped ({_first_reason(result, 'skipped', shown)})", 1)
    if not result.passed:
        failed = ", ".join(f"{r.backend} on {r.device}" for r in result.rows if r.status.value == "fail")
        fail(f"verification failed: {failed} differ from the reference or fail their checks "
             f"({_first_reason(result, 'fail', shown)})", 1)


def _first_reason(result, status: str, table_shown: bool) -> str:
    """What the last line of a verify points at: the table above when it was printed; with -q or --json (no table)
    the first row with `status` and its reason, so the line never points at output that is not there."""
    if table_shown:
        return "see the table above"
    row = next((r for r in result.rows if r.status.value == status), None)
    if row is None:
        return "no candidate to compare"
    why = next(iter(row.problems), None) or row.reason or "its outputs are outside the tolerance"
    return f"{row.backend} on {row.device}: {why}"


@app.command(cls=PlainHelp, epilog=examples(
    "fcx predict shoe.jpg        # the best model in artifacts/",
    "fcx predict photos/ 'more/*.png' --top-k 5 --jsonl",
    "fcx predict scan.png --model artifacts/model.ts --invert no",
    "fcx predict photos/ --save-prepared prepared/   # see what the model saw",
))
@handle_errors
def predict(
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Image files, folders or glob patterns")],
    model: Annotated[Optional[Path], typer.Option(help="model.onnx, model.ts, model.pt2, model.fused.pt or model.pt [default: best in ARTIFACTS]; with --url, the served model's name")] = None,
    runtime: Annotated[Optional[str], typer.Option(help=f"Runtime: {', '.join(registry.runtimes())} [default: the fastest `fcx bench` measured here for this many images, else the first that runs the file]")] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
    top_k: Annotated[int, typer.Option(help="Classes to keep per image (shown with --wide and in JSON)")] = 3,
    invert: Annotated[str, typer.Option(help="auto (from the background), yes (dark object on light) or no (light on dark)")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    save_prepared: Annotated[Optional[Path], typer.Option("--save-prepared", help="Write the image fed to the model for each file into this folder (PNG)")] = None,
    masks: Annotated[Path, typer.Option("--masks", help="A segmentation model's mask and overlay PNGs go into this folder")] = Path("masks"),
    wide: Annotated[bool, typer.Option("--wide", help="Also show the runner-up classes")] = False,
    allow_stale: Annotated[bool, typer.Option("--allow-stale", help="Run an artifact made from another model.pt than the folder's (a warning, not an error)")] = False,
    url: Annotated[Optional[str], typer.Option("--url", metavar="URL", help="Classify on a server instead (KServe v2: http://HOST:PORT or grpc://HOST:PORT, e.g. fcx serve's); --model is then the served model's name")] = None,
    timeout: TimeoutOpt = None,
    json_out: JsonFlag = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per line, as each batch finishes")] = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Classify or segment image files (any size, gray or colour).

    A segmentation model writes a mask and an overlay PNG per file into --masks.

    Results stream as each batch of 256 files is done. A file that cannot be read is an error row;
    the others are classified, and the exit code is 2 at the end."""
    from fcexport.pipeline import predict as run

    _check_timeout(timeout, url)
    if url:
        from fcexport.pipeline import predict_remote

        if runtime or save_prepared or device != "cpu":
            raise FcxError("--url classifies on the server; --runtime, --device and --save-prepared are for local runs")
        predictions = predict_remote(images, url, str(model) if model else None, top_k, invert, timeout, masks)
    else:
        if model is not None and not model.exists() and not model.suffix:
            raise FcxError(f"--model {model}: no such file; a served model's name goes with --url URL")
        predictions = run(images, model, artifacts, top_k, invert, device, runtime, save_prepared, allow_stale, masks)
    if predictions.stale:
        lines.warning(f"{predictions.stale} (--allow-stale); run `fcx export --artifacts {artifacts}` (and `fcx fuse-bn`) again")
    rows, predictor = predictions.rows, predictions.predictor
    mode = "jsonl" if jsonl else "json" if json_out else "table"
    errors = lines.stream_predictions(predictor, rows, mode, wide, json_file)
    if errors:
        first = errors[0]
        fail(f"{len(errors)} file(s) could not be classified (first: {first['error']})", 2)


@app.command(cls=PlainHelp, epilog=examples(
    "fcx bench                   # every backend at batch 1, 64, 1024",
    "fcx bench --batch-sizes 1 --backends onnxruntime --json",
))
@handle_errors
def bench(
    artifacts: ArtifactsOpt = Path("artifacts"),
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes")] = "1,64,1024",
    backends: BackendsOpt = "all",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    warmup: Annotated[int, typer.Option(help="Untimed calls first")] = 20,
    repeat: Annotated[int, typer.Option(help="Timed calls (at most; each batch size also stops after --seconds)")] = 200,
    seconds: Annotated[float, typer.Option(help="Time budget per backend and batch size (warm-up included)")] = 1.0,
    quiet: QuietFlag = False,
    json_out: JsonFlag = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Latency (p50/p90) and throughput per backend and batch size."""
    from cli import render
    from fcexport.pipeline import bench as run

    with render.steps("bench", not (quiet or json_out)) as on_step:
        rows = run(artifacts, _int_list(batch_sizes, "--batch-sizes"), _backends(backends), device, warmup, repeat, seconds,
                   on_step=on_step)
    _emit_json(json_with_commands([r.to_json() for r in rows]), json_out, json_file)
    if not (json_out or quiet):
        render.bench_table(rows, artifacts, warmup)


@app.command(cls=PlainHelp, short_help="Serve a Triton model repository on 127.0.0.1.", epilog=examples(
    "fcx export --triton         # artifacts/model_repository",
    "fcx serve                   # http://127.0.0.1:8000, grpc://127.0.0.1:8001",
    "fcx verify --url http://127.0.0.1:8000   # in another terminal",
    "fcx predict shirt.jpg --url grpc://127.0.0.1:8001",
))
@handle_errors
def serve(
    artifacts: ArtifactsOpt = Path("artifacts"),
    repository: Annotated[Optional[Path], typer.Option(help="A model repository from fcx export --triton [default: ARTIFACTS/model_repository]")] = None,
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP port on 127.0.0.1")] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC port on 127.0.0.1")] = 8001,
    server_env: Annotated[Optional[Path], typer.Option("--server-env", help="The server's venv (numpy < 2, nvidia-pytriton) [default: $FCX_TRITON_ENV, else .venv-triton]")] = None,
) -> None:
    """Serve a Triton model repository with the real tritonserver on 127.0.0.1 until Ctrl-C.

    The server is the one in the nvidia-pytriton wheel (python backend only): each onnxruntime_onnx model
    runs in a stand-in that runs the same model.onnx in onnxruntime. Stops cleanly on Ctrl-C or SIGTERM,
    and when fcx itself is killed; nothing is left running or in /dev/shm."""
    import signal
    import time

    from cli import render
    from fcexport.pipeline import serve as run

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        with run(artifacts, repository, http_port, grpc_port, server_env) as running:
            render.serving(running)
            while running.alive():
                time.sleep(0.5)
            raise FcxError(f"tritonserver stopped by itself (exit code {running.process.returncode}): {running.last_log()}")
    except KeyboardInterrupt:
        render.note("stopped: tritonserver exited, nothing left running")


@app.command(cls=PlainHelp, short_help="Show what a model file holds, without running it.", epilog=examples(
    "fcx inspect                 # every model file in artifacts/",
    "fcx inspect artifacts/model.onnx --json",
))
@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(metavar="FILE|FOLDER", help="A model file or a folder")] = Path("artifacts"),
    json_out: JsonFlag = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Show what a model file holds, without running it: spec, inputs/outputs, opsets, sizes, folds, provenance.

    Each file is checked as fcx reads it (bounds, zip records) and against the folder's manifest."""
    from cli import render
    from fcexport.pipeline import inspect as run

    result = run(path)
    _emit_json(result.to_json(), json_out, json_file)
    if not json_out:
        render.inspection(result)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
