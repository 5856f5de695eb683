"""Orchestration: the one module that calls several stages. Each public function is one `fcx` command.

Every way in (train, import) writes the same model.pt; every later step reads it with
`checkpoint.load_model` and never needs to know how the model came in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fcexport import artifacts as names
from fcexport.compare import Tolerance, accuracy, compare_weights
from fcexport.errors import FcxError, check_choices
from fcexport.runtimes import DEVICES, DeviceUnavailable, Predictor, module_predictor, open_predictor

DEFAULT_TOLERANCE = Tolerance()
MAX_BENCH_BATCH = 65536

# ---- ways in -----------------------------------------------------------------------------


def train(opts, on_epoch=None) -> dict:
    """`fcx train`: load data, train (split or k-fold), evaluate on test, write model.pt, metrics and plots."""
    from fcexport import plots
    from fcexport.checkpoint import save_model
    from fcexport.data import dataset_source, load_dataset, train_val_split
    from fcexport.files import check_writable_folder, write_json_atomic, write_text_atomic
    from fcexport.models import count_parameters
    from fcexport.preprocess import object_fill
    from fcexport.spec import ModelSpec
    from fcexport.training import build_for, cross_validate, evaluate, fit, history_csv, resolve_device

    opts = opts.with_arch_defaults()
    opts.validate()
    resolve_device(opts.device)
    out = Path(opts.artifacts)
    check_writable_folder(out)  # before minutes of training, not after
    log = []

    def log_epoch(record: dict) -> None:
        """history.csv grows after every epoch, so progress can be followed (tail -f) and survives a kill."""
        log.append(record)
        write_text_atomic(out / "history.csv", history_csv(log))
        if on_epoch:
            on_epoch(record)

    dataset = load_dataset(opts.data, opts.data_root, test_data=opts.test_data, class_names=opts.class_names)
    if opts.flip is None:
        opts.flip = dataset.name == "fashion-mnist"
    started = time.perf_counter()
    cv_summary = None
    if opts.folds:
        result, config, cv_summary = cross_validate(dataset, opts, log_epoch)
    else:
        train_split, val = train_val_split(dataset.train, opts.val_split, opts.seed)
        model, config = build_for(dataset, opts)
        result = fit(model, train_split, val, opts, log_epoch)
    seconds = time.perf_counter() - started
    device = next(result.model.parameters()).device
    test_loss, test_acc, test_pred = evaluate(result.model, dataset.test, device)
    metrics = {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "interrupted": result.interrupted,
        "train_seconds": seconds,
        "samples_per_second": result.samples_per_second,
        "parameters": count_parameters(result.model),
        "device": str(device),
        "cross_validation": cv_summary,
    }
    normalize = config["normalize"]
    spec = ModelSpec(
        input_shape=list(config["input_shape"]),
        class_names=list(dataset.class_names),
        preprocess={"mode": "object", "object_fill": object_fill(dataset.train.images[:2000, 0].numpy())},
        normalization={"mean": [normalize["mean"]], "std": [normalize["std"]]} if normalize else None,
        architecture={"kind": "mlp", **config},
        dataset={
            "name": dataset.name,
            "source": dataset_source(opts.data),
            "test_source": dataset_source(opts.test_data) if opts.test_data else None,
            "root": str(Path(opts.data_root).resolve()) if opts.data_root else None,
            "train": len(dataset.train),
            "test": len(dataset.test),
        },
        metrics=metrics,
        training=asdict(opts),
    )
    save_model(result.model.cpu().eval(), spec, out / names.MODEL)
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "history.csv", history_csv(result.history))
    title = f"{config['arch']} on {dataset.name}: test accuracy {test_acc:.2%}"
    plots.save_curves(result.history, out / "curves.png", result.best_epoch, title)
    plots.save_confusion(dataset.test.labels, test_pred, dataset.class_names, out / "confusion.png")
    return {"metrics": metrics, "history": result.history, "artifacts": str(out), "dataset": dataset.name}


def import_weights(
    weights: str | Path,
    model_def: str,
    input_shape,
    model_args: dict | None = None,
    key: str | None = None,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    artifacts: str | Path = "artifacts",
) -> Path:
    """`fcx import`: a state dict plus the model's code -> ARTIFACTS/model.pt (no code needed afterwards)."""
    from fcexport.checkpoint import save_model
    from fcexport.sources import from_state_dict

    model, spec = from_state_dict(weights, model_def, input_shape, model_args, key, class_names, mean, std)
    return save_model(model, spec, Path(artifacts) / names.MODEL)


def import_model(
    module,
    input_shape,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    artifacts: str | Path = "artifacts",
) -> Path:
    """A live nn.Module (a notebook's model) -> ARTIFACTS/model.pt, ready for fuse, export, verify, predict, bench.

    `input_shape` is (C, H, W); `mean`/`std` (one value or one per channel) is the normalisation the
    model expects on [0, 1] pixels: it becomes part of the stored model, so artifacts take [0, 1] pixels.
    """
    from fcexport.checkpoint import save_model
    from fcexport.sources import from_module

    model, spec = from_module(module, input_shape, class_names, mean, std)
    return save_model(model, spec, Path(artifacts) / names.MODEL)


# ---- fuse --------------------------------------------------------------------------------


def fused_model(model, spec, source: Path | None = None):
    """(fused module, FuseReport, spec of the fused module) for a model loaded from `source`."""
    import torch

    from fcexport.files import sha256_file
    from fcexport.folding import fuse_with_report
    from fcexport.spec import ModelSpec

    fused, report = fuse_with_report(model, torch.zeros(2, *spec.input_shape))
    provenance = {**spec.provenance, "fused": True, "folds": report.folded, "left": report.left}
    if source is not None:
        provenance |= {"source": source.name, "source_sha256": sha256_file(source)}
    return fused, report, ModelSpec.from_dict({**spec.to_dict(), "provenance": provenance})


def fuse(
    model_path: Path,
    out_path: Path,
    verify: bool = False,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    device: str = "cpu",
    data: str | None = None,
    data_root: str | None = None,
) -> dict:
    """`fcx fuse-bn`: write the fused model, time both at batch 1, optionally verify parity first."""
    from fcexport import parity
    from fcexport.timing import measure
    from fcexport.checkpoint import load_model, save_model

    model_path, out_path = Path(model_path), Path(out_path)
    if out_path.resolve() == model_path.resolve():
        raise FcxError(f"{out_path}: the fused model would overwrite its own source; write it elsewhere")
    original, spec = load_model(model_path)
    fused, report, fused_spec = fused_model(original, spec, model_path)
    before = module_predictor(original, "eager", device, model_path, spec)
    after = module_predictor(fused, "fused", device, out_path, fused_spec)
    one = np.random.default_rng(0).random((1, *spec.input_shape), dtype=np.float32)
    result = {
        "source": str(model_path),
        "output": str(out_path),
        "report": report.as_dict(),
        "latency_ms": {"before": measure(before, one)["p50_ms"], "after": measure(after, one)["p50_ms"], "device": device},
        "verification": None,
    }
    if verify:
        inputs = parity.make_inputs(spec, data, data_root, probes=parity.probe_inputs(original, spec))
        reference = module_predictor(original.to("cpu"), "eager", "cpu", model_path, spec)(inputs.x)
        rows = parity.compare_predictors(reference, [after], inputs, tolerance)
        result["verification"] = parity.report(rows, inputs, accuracy(reference, inputs.labels), tolerance)
        if not result["verification"]["passed"]:
            return result  # a failed fold is reported, never written
    save_model(fused.cpu(), fused_spec, out_path)
    if out_path.parent.resolve() == model_path.parent.resolve() and out_path.name == names.FUSED:
        from fcexport.checkpoint import now_iso
        from fcexport.export_onnx import versions

        names.record_in_manifest(out_path.parent, {names.FUSED: fused_spec.provenance["source_sha256"]}, versions(), now_iso())
    return result


# ---- export ------------------------------------------------------------------------------

FORMATS = ("torchscript", "onnx")


def export(model_path: Path, artifacts: Path, formats=FORMATS, opset: int | None = None, fuse: bool = True,
           int8: bool = False) -> dict:
    """`fcx export`: model.pt -> (fused) module -> model.ts / model.onnx [/ model.int8.onnx] -> manifest.json."""
    from fcexport.checkpoint import load_model, now_iso
    from fcexport.export_onnx import DEFAULT_OPSET, export_int8_onnx, export_onnx, versions
    from fcexport.export_torchscript import export_torchscript
    from fcexport.files import publish, sha256_file, staging_folder

    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise FcxError(f"formats are torchscript and onnx, got {', '.join(sorted(unknown)) or 'nothing'}")
    if int8 and "onnx" not in formats:
        raise FcxError("the int8 model is quantized from model.onnx: export onnx as well")
    model_path, artifacts = Path(model_path), Path(artifacts)
    model, spec = load_model(model_path)
    folds = []
    if fuse:
        model, report, spec = fused_model(model, spec)
        folds = report.folded
    spec.provenance = {
        **spec.provenance,
        "exported": now_iso(),
        "source": model_path.name,
        "source_sha256": sha256_file(model_path),
        "fused": bool(fuse or spec.provenance.get("fused")),
        **versions(),
    }
    source_sha256 = spec.provenance["source_sha256"]
    removed = []
    with staging_folder(artifacts) as stage:  # the previous set stays whole until everything is written
        if "torchscript" in formats:
            export_torchscript(model, spec, stage / names.BACKEND_FILES["torchscript"])
        if "onnx" in formats:
            onnx_path = export_onnx(model, spec, stage / names.BACKEND_FILES["onnxruntime"], opset or DEFAULT_OPSET)
            if int8:
                export_int8_onnx(onnx_path, stage / names.BACKEND_FILES["onnxruntime-int8"])
        written = publish(stage, artifacts)
    int8_path = artifacts / names.BACKEND_FILES["onnxruntime-int8"]
    if "onnx" in formats and not int8 and int8_path.is_file():  # quantized from the replaced model.onnx: stale
        int8_path.unlink()
        removed.append(str(int8_path))
    manifest = names.record_in_manifest(artifacts, {p.name: source_sha256 for p in written}, versions(), now_iso())
    return {"written": [str(p) for p in written], "removed": removed, "manifest": str(manifest), "fused": fuse, "folds": folds}


# ---- use ---------------------------------------------------------------------------------


def open_backend(backend: str, artifacts: Path, device: str) -> Predictor:
    """A backend's artifact from a folder. Without model.fused.pt, `fused` folds model.pt in memory."""
    path = Path(artifacts) / names.BACKEND_FILES[backend]
    model_path = Path(artifacts) / names.MODEL
    if backend == "fused" and not path.is_file() and model_path.is_file():
        from fcexport.checkpoint import load_model

        fused, _, spec = fused_model(*load_model(model_path), model_path)
        return module_predictor(fused, "fused", device, Path("(fused in memory from model.pt)"), spec)
    if not path.is_file():
        raise DeviceUnavailable(f"{path} not found", hint=names.BACKEND_MADE_BY[backend])
    return open_predictor(path, device)


def stale_reason(path: str | Path) -> str | None:
    """Why an artifact may not answer for its folder's model.pt (stale, changed, unlisted), or None."""
    path = Path(path)
    model_path = path.parent / names.MODEL
    if path.name == names.MODEL or not model_path.is_file():
        return None
    from fcexport.files import sha256_file

    return names.check_against_manifest(path, names.read_manifest(path.parent), sha256_file(model_path))


def predict(images: list[str | Path], model: str | Path | None = None, artifacts: str | Path = "artifacts",
            top_k: int = 3, invert: str = "auto", device: str = "cpu") -> Iterator[dict]:
    """Classify image files with `model`, or the best artifact in the folder (ONNX > TorchScript > fused > model):
    one dict per image (file, label, index, probability, top)."""
    from fcexport.classify import predict_files

    path = Path(model) if model is not None else names.find_default_model(Path(artifacts))
    return predict_files(open_predictor(path, device), images, top_k, invert)


def verify(
    artifacts: str | Path = "artifacts",
    backends=names.BACKENDS,
    devices=DEVICES,
    data: str | None = None,
    data_root: str | None = None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> dict:
    """`fcx verify`: model.pt on cpu is the reference; every other backend x device is compared with it."""
    from fcexport import parity
    from fcexport.checkpoint import load_model
    from fcexport.files import sha256_file

    check_choices("backends", backends, names.BACKENDS)
    check_choices("devices", devices, DEVICES)
    artifacts = Path(artifacts)
    reference_path = artifacts / names.MODEL
    exported = [name for backend, name in names.BACKEND_FILES.items() if backend != "eager" and (artifacts / name).is_file()]
    model, spec = load_model(reference_path)
    if not exported:
        raise FcxError(f"{artifacts}: nothing to verify: the folder holds model.pt but no fused or exported model", hint="export")
    model_sha256 = sha256_file(reference_path)
    manifest = names.read_manifest(artifacts)
    inputs = parity.make_inputs(spec, data, data_root, probes=parity.probe_inputs(model, spec))
    reference = module_predictor(model, "eager", "cpu", reference_path, spec)(inputs.x)
    fused, _, _ = fused_model(model, spec)
    expected = {"fused": _float_tensors(fused), "unfused": _float_tensors(model)}
    candidates = []
    for device in devices:
        for backend in backends:
            if (backend, device) == ("eager", "cpu"):
                continue  # that is the reference itself
            try:
                candidates.append(open_backend(backend, artifacts, device))
            except DeviceUnavailable as exc:
                hint = None if exc.hint == "cpu" else exc.hint  # verify chooses devices with its own option
                candidates.append(parity.Skipped(backend, device, str(exc), hint))
    rows = parity.compare_predictors(reference, candidates, inputs, tolerance)
    for row, candidate in zip(rows, candidates, strict=True):
        if not isinstance(candidate, Predictor):
            continue
        problems = parity.spec_differences(spec, candidate.spec)
        if candidate.source.is_file():
            integrity = names.check_against_manifest(candidate.source, manifest, model_sha256)
            problems += [integrity] if integrity else []
        if candidate.weights is not None and candidate.backend not in names.APPROXIMATE_BACKENDS:
            kind = "fused" if candidate.spec.provenance.get("fused") else "unfused"
            problems += [f"{p} (compared with the {kind} model)" for p in compare_weights(expected[kind], candidate.weights())]
        parity.add_problems(row, problems)
    return parity.report(rows, inputs, accuracy(reference, inputs.labels), tolerance)


def _float_tensors(model) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


def bench(artifacts: str | Path = "artifacts", batch_sizes=(1, 64, 1024), backends=names.BACKENDS, device: str = "cpu",
          warmup: int = 20, repeat: int = 200, max_seconds: float = 1.0, seed: int = 0) -> list[dict]:
    """`fcx bench`: one row per backend x batch size; unavailable backends are rows with a reason."""
    from fcexport.timing import measure

    check_choices("backends", backends, names.BACKENDS)
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > MAX_BENCH_BATCH:
        raise FcxError(f"batch sizes must be integers from 1 to {MAX_BENCH_BATCH}, got {list(batch_sizes)}")
    if warmup < 0 or repeat < 1 or not 0 < max_seconds <= 600:
        raise FcxError(f"warmup must be >= 0, repeat >= 1 and seconds in (0, 600], got {warmup}, {repeat}, {max_seconds}")
    artifacts = Path(artifacts)
    names.find_default_model(artifacts)  # a clear error when the folder holds no model at all
    rng = np.random.default_rng(seed)
    rows = []
    for backend in backends:
        try:
            predictor = open_backend(backend, artifacts, device)
        except DeviceUnavailable as exc:
            rows.append({"backend": backend, "device": device, "batch_size": None, "skipped": str(exc), "hint": exc.hint})
            continue
        for batch in batch_sizes:
            x = rng.random((batch, *predictor.spec.input_shape), dtype=np.float32)
            rows.append({"backend": backend, "device": device, "batch_size": batch, **measure(predictor, x, warmup, repeat, max_seconds)})
    return rows
