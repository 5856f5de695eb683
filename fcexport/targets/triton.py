"""Exporter: a Triton Inference Server model repository, `model_repository/` (opt-in: `fcx export --triton`).

`NAME/` serves model.onnx with Triton's onnxruntime backend and, when TorchScript was exported too, `NAME_torchscript/`
serves model.ts with its libtorch backend: the same bytes as the folder's own files, with a config.pbtxt built as
Triton's ModelConfig message (batch dimension out of dims, dynamic batching, instance groups, labels for Triton's
classification extension, the spec as a parameter) and checked against each graph after it is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.onnx_checks import MAX_ONNX_BYTES, check_onnx_model, read_onnx_spec
from fcexport.spec import ModelSpec
from fcexport.targets import METADATA_FILE, Exporter, ExportSettings, TritonSettings, archive_fingerprint
from fcexport.triton_config import (CONFIG_FILE, LABELS_FILE, LIBTORCH_PLATFORM, MODEL_FILES, ONNX_PLATFORM, REPOSITORY, Served,
                                    TORCHSCRIPT_SUFFIX, VERSION, config_problems, config_text, labels_text, model_config,
                                    read_repository, recorded_problems, served_spec, unexpected_fields)

FOLDER = f"{REPOSITORY}/"


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    from fcexport.files import write_bytes_atomic, write_text_atomic

    name = settings.triton.name
    served = [(name, ONNX_PLATFORM)]
    if (stage / MODEL_FILES[LIBTORCH_PLATFORM]).is_file():  # exported in this run: served by libtorch too
        served.append((name + TORCHSCRIPT_SUFFIX, LIBTORCH_PLATFORM))
    labels = labels_text(spec)
    for model, platform in served:
        folder = stage / REPOSITORY / model
        (folder / VERSION).mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / CONFIG_FILE, config_text(model_config(model, platform, spec, settings.triton)))
        write_text_atomic(folder / LABELS_FILE, labels)
        write_bytes_atomic(folder / VERSION / MODEL_FILES[platform], (stage / MODEL_FILES[platform]).read_bytes())
    problems = check_repository(stage / REPOSITORY, lambda path: path.read_bytes(), stage, settings.triton)[1]
    if problems:  # a bug in the writer, not in the model: say what
        raise FcxError(f"the Triton repository written does not check: {'; '.join(problems[:3])}")


def check(folder: Path, read: Callable[[Path], bytes]) -> list[str]:
    """What is wrong with the repository of an artifacts folder (see check_repository)."""
    return check_repository(Path(folder) / REPOSITORY, read, Path(folder))[1]


def check_repository(repository: Path, read: Callable[[Path], bytes], folder: Path | None = None,
                     settings: TritonSettings | None = None) -> tuple[list[Served], list[str]]:
    """(its models, what is wrong with them): each config parsed against Triton's schema, checked against the file
    it serves (names, dtypes, dims, batch dimension, labels), and, with `folder` (the artifacts folder it belongs
    to), each served file the same bytes as that folder's own model.onnx / model.ts: those are the files fcx verify
    compares with a fresh export, so a repository serving anything else fails. Each config.pbtxt and labels.txt
    must then be, byte for byte, what fcx export writes from the served file's spec and `settings` (default: those
    recorded in `folder`'s manifest); a repository with no manifest beside it must be what export writes with some
    settings. `read` reads a file (and may check its bytes: they are the ones judged)."""
    if repository.is_symlink():
        return [], [f"{repository}: a symbolic link; fcexport reads a repository only as the folder export wrote"]
    try:
        served = read_repository(repository, read)
        if settings is None and folder is not None:
            settings = recorded_settings(Path(folder))
    except FcxError as exc:
        return [], [str(exc)]
    problems = []
    for model in served:
        try:
            data = read(model.model_file)
            spec, graph = _served_file(model.platform, data, model.model_file)
            own = Path(folder) / MODEL_FILES.get(model.platform, "") if folder is not None else None
            if own is not None and not own.is_file():
                problems.append(f"{model.name}/{VERSION}/{model.model_file.name} cannot be checked: the folder's own "
                                f"{own.name}, which it must equal, is missing (export again with --triton)")
            elif own is not None and read(own) != data:
                problems.append(f"{model.name}/{VERSION}/{model.model_file.name} is not the folder's {own.name}")
        except FcxError as exc:
            problems.append(str(exc))
            continue
        found = config_problems(model, spec, graph)
        if not found and settings is None:
            found = unexpected_fields(model, spec)
        elif not found:
            folder_of = model.model_file.parent.parent
            try:
                found = recorded_problems(model, spec, settings, read(folder_of / CONFIG_FILE), read(folder_of / LABELS_FILE))
            except FcxError as exc:
                found = [str(exc)]
        problems += found
    return served, problems


def recorded_settings(folder: Path) -> TritonSettings | None:
    """The TritonSettings fcx export recorded in `folder`'s manifest when it wrote the repository; None when the
    folder has no manifest (a repository on its own). A manifest without them was not written by this export."""
    from fcexport import artifacts

    manifest = artifacts.read_manifest(folder)
    if manifest is None:
        return None
    chosen = artifacts.recorded_settings(manifest, "triton")
    if chosen is None:
        raise FcxError(f"{artifacts.MANIFEST} records no Triton settings, so the repository's configs cannot be checked "
                       "against what export wrote", hint="export-triton")
    try:
        return TritonSettings(**chosen)
    except (TypeError, FcxError) as exc:
        raise FcxError(f"{artifacts.MANIFEST}: the Triton settings it records are not fcx export's ({str(exc)[:200]})",
                       hint="export-triton") from exc


def describe(read: Callable[[Path], bytes], path: Path) -> tuple[ModelSpec, dict]:
    """(spec, details) of a repository folder (`path`), read through `read` and checked, never served: each model's
    platform, batch limit, instances and batching; the spec its configs carry (checked equal to the served file's)."""
    served, problems = check_repository(Path(path), read, Path(path).parent)
    if problems:
        raise FcxError(f"{path}: {problems[0]}")
    models = {}
    for model in served:
        config = model.config
        groups = ", ".join(f"{g.count} x {g.Kind.Name(g.kind)}" for g in config.instance_group)
        models[model.name] = (f"{config.platform}, max batch {config.max_batch_size}, {groups}"
                              + (", dynamic batching" if config.HasField("dynamic_batching") else ""))
    return served_spec(served[0].config), {"models": models}


def _served_file(platform: str, data: bytes, path: Path):
    """(spec, graph io or None) of a served file, read without running it."""
    if platform == ONNX_PLATFORM:
        if len(data) > MAX_ONNX_BYTES:
            raise FcxError(f"{path}: larger than fcexport reads")
        proto, peak = check_onnx_model(data, path)

        def io(value):
            dims = value.type.tensor_type.shape.dim[1:]
            return value.name, tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)

        return read_onnx_spec({p.key: p.value for p in proto.metadata_props}, path, peak), (io(proto.graph.input[0]), io(proto.graph.output[0]))
    if platform == LIBTORCH_PLATFORM:
        return archive_fingerprint(data, path, f"extra/{METADATA_FILE}")[0], None
    raise FcxError(f"{path}: platform '{platform}' is not one fcexport writes")


EXPORTER = Exporter(name="triton", files=(FOLDER,), format="triton-repository", write=write, check=check, describe=describe,
                    summary=f"Triton model repository ({REPOSITORY}/: onnxruntime, and libtorch with TorchScript)",
                    builds_on="onnx", by_default=False)
