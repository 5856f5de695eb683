"""Triton model configurations: built as Triton's own `ModelConfig` message (tritonclient ships its schema), written
as text, parsed back, and checked against the graph each one serves. Shared by the triton exporter, fcx serve and
fcx verify; nothing here starts a server.

A repository holds `NAME/{config.pbtxt, labels.txt, 1/model.onnx}` (platform onnxruntime_onnx) and, when TorchScript
was exported too, `NAME_torchscript/{..., 1/model.ts}` (platform pytorch_libtorch, tensors named `pixels__0` and
`logits__0` as that backend requires).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec
from fcexport.targets import MODEL_NAME, TritonSettings

REPOSITORY = "model_repository"
CONFIG_FILE, LABELS_FILE, VERSION = "config.pbtxt", "labels.txt", "1"
ONNX_PLATFORM, LIBTORCH_PLATFORM = "onnxruntime_onnx", "pytorch_libtorch"
TORCHSCRIPT_SUFFIX = "_torchscript"
MODEL_FILES = {ONNX_PLATFORM: "model.onnx", LIBTORCH_PLATFORM: "model.ts"}
TENSOR_NAMES = {ONNX_PLATFORM: ("pixels", "logits"), LIBTORCH_PLATFORM: ("pixels__0", "logits__0")}
SPEC_PARAMETER = "fcexport_spec"  # the spec as JSON: a client of the served model prepares images with it
MAX_CONFIG_BYTES = 1 << 20
MAX_LABELS_BYTES = 1 << 20
MAX_MODELS = 64
# What onnxruntime ran best with here (fcexport.targets.onnxruntime.session_options): sequential execution, one
# inter-op thread, at most 4 intra-op threads per instance; Triton's onnxruntime backend reads these keys.
ONNXRUNTIME_PARAMETERS = {"execution_mode": "0", "inter_op_thread_count": "1", "intra_op_thread_count": "4"}


def schema():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


@dataclass(frozen=True)
class Served:
    """One model of a repository as read from disk: its folder name, parsed config and labels."""

    name: str
    config: object  # model_config_pb2.ModelConfig
    labels: tuple[str, ...]
    model_file: Path

    @property
    def platform(self) -> str:
        return self.config.platform


def other_output_names(platform: str, spec: ModelSpec) -> list[str]:
    """The served names of the model's other outputs: the file's own for ONNX, libtorch's positional `name__i`."""
    return [name if platform != LIBTORCH_PLATFORM else f"{name}__{i}" for i, (name, _) in enumerate(spec.other_outputs, 1)]


def model_config(name: str, platform: str, spec: ModelSpec, settings) -> object:
    """The ModelConfig message of one served model (`settings`: a TritonSettings)."""
    types = schema()
    input_name, output_name = TENSOR_NAMES[platform]
    kind = types.ModelInstanceGroup.KIND_GPU if settings.gpu else types.ModelInstanceGroup.KIND_CPU
    config = types.ModelConfig(
        name=name, platform=platform, max_batch_size=settings.max_batch_size, default_model_filename=MODEL_FILES[platform],
        input=[types.ModelInput(name=input_name, data_type=types.TYPE_FP32, dims=list(spec.input_shape))],
        output=[types.ModelOutput(name=output_name, data_type=types.TYPE_FP32, dims=list(spec.output_shape),
                                   label_filename=LABELS_FILE),  # dense too: the class of each channel
                *(types.ModelOutput(name=served, data_type=types.TYPE_FP32, dims=list(shape))
                  for served, (_, shape) in zip(other_output_names(platform, spec), spec.other_outputs))],
        dynamic_batching=types.ModelDynamicBatching(max_queue_delay_microseconds=100),
        instance_group=[types.ModelInstanceGroup(count=settings.instances, kind=kind)],
        version_policy=types.ModelVersionPolicy(latest=types.ModelVersionPolicy.Latest(num_versions=1)),
    )
    parameters = {SPEC_PARAMETER: json.dumps(spec.to_dict(), sort_keys=True)}
    if platform == ONNX_PLATFORM:
        parameters |= ONNXRUNTIME_PARAMETERS
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def config_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(data: bytes, path: Path | str):
    """A config.pbtxt's bytes as a ModelConfig; a syntax error names the line and column (the server only says
    "failed to read text proto")."""
    from google.protobuf import text_format

    if len(data) > MAX_CONFIG_BYTES:
        raise FcxError(f"{path}: {len(data):,} bytes is larger than a model configuration fcexport reads ({MAX_CONFIG_BYTES:,})")
    try:
        return text_format.Parse(data.decode("utf-8"), schema().ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise FcxError(f"{path}: not a Triton model configuration: {str(exc)[:200]}", hint="export-triton") from exc


def labels_text(spec: ModelSpec) -> str:
    bad = [name for name in spec.class_names if not name.strip() or re.search(r"[\r\n]", name)]
    if bad:
        raise FcxError(f"class name {bad[0]!r} cannot be a line of {LABELS_FILE} (empty, or holds a line break)")
    return "".join(f"{name}\n" for name in spec.class_names)


def served_spec(config) -> ModelSpec | None:
    """The spec a served config carries (SPEC_PARAMETER), or None."""
    if SPEC_PARAMETER not in config.parameters:
        return None
    text = config.parameters[SPEC_PARAMETER].string_value
    try:
        return ModelSpec.from_dict(json.loads(text), f"parameter {SPEC_PARAMETER}")
    except (ValueError, TypeError) as exc:
        raise FcxError(f"the served configuration's {SPEC_PARAMETER} is not an fcexport spec ({exc})") from exc


def read_repository(folder: Path, read: Callable[[Path], bytes]) -> list[Served]:
    """Every model of a repository folder: configs parsed, labels read, through `read` (which can check each file's
    bytes against a manifest as it reads them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FcxError(f"{folder}: no model repository here", hint="export-triton")
    if (folder / REPOSITORY).is_dir() and not (folder / CONFIG_FILE).exists():
        raise FcxError(f"{folder}: an artifacts folder, not a repository; pass {folder / REPOSITORY}")
    models = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise FcxError(f"{folder}: the model repository holds no model", hint="export-triton")
    if len(models) > MAX_MODELS:
        raise FcxError(f"{folder}: {len(models)} models is more than fcexport reads from a repository ({MAX_MODELS})")
    served = []
    for model in models:
        if not MODEL_NAME.fullmatch(model.name):
            raise FcxError(f"{model}: '{model.name[:100]}' is not a model name fcexport writes (letters, digits, '_', '.', '-')",
                           hint="export-triton")
        for file, limit in ((model / CONFIG_FILE, MAX_CONFIG_BYTES), (model / LABELS_FILE, MAX_LABELS_BYTES)):
            if file.is_file() and file.stat().st_size > limit:  # before a byte is read
                raise FcxError(f"{file}: {file.stat().st_size:,} bytes is larger than fcexport reads for it ({limit:,})")
        config = parse_config(read(model / CONFIG_FILE), model / CONFIG_FILE)
        labels_file = model / LABELS_FILE
        labels = tuple(read(labels_file).decode("utf-8", "replace").splitlines()) if labels_file.is_file() else ()
        # the file name is fcexport's, never the config's (a default_model_filename of ../../x would read elsewhere)
        served.append(Served(model.name, config, labels, model / VERSION / MODEL_FILES.get(config.platform, "model.onnx")))
    return served


def config_problems(served: Served, spec: ModelSpec, graph: tuple[tuple[str, tuple], tuple[str, tuple]] | None,
                    remote: bool = False) -> list[str]:
    """What in one served model's config disagrees with Triton's rules or with the model it serves: `spec` (its
    class names and input shape) and, for ONNX, `graph` ((input name, dims), (output name, dims)) read from the file,
    dims without the batch dimension (None where symbolic). A `remote` config (what a server reports) may be fcx
    serve's python-backend stand-in, and its labels are those Triton's classification returned."""
    types = schema()
    config, where = served.config, f"{served.name}/{CONFIG_FILE}" if not remote else f"the served configuration of {served.name}"
    problems = []
    if config.name and config.name != served.name:
        problems.append(f"{where}: name '{config.name}' is not its folder's name '{served.name}'")
    standin = remote and config.backend == "python" and not config.platform
    if config.platform not in TENSOR_NAMES and not standin:
        return problems + [f"{where}: platform '{config.platform}' is not one fcexport writes ({', '.join(TENSOR_NAMES)})"]
    if not remote and config.default_model_filename != MODEL_FILES[config.platform]:
        problems.append(f"{where}: default_model_filename '{config.default_model_filename}' should be '{MODEL_FILES[config.platform]}'")
    if config.max_batch_size < 1:
        problems.append(f"{where}: max_batch_size {config.max_batch_size}: the model has a batch dimension, so it must be >= 1")
    if len(config.input) != 1 or len(config.output) != 1 + len(spec.other_outputs):
        return problems + [f"{where}: {len(config.input)} inputs and {len(config.output)} outputs; the model has 1 and "
                           f"{1 + len(spec.other_outputs)}"]
    expected_names = TENSOR_NAMES[ONNX_PLATFORM if standin else config.platform]
    if graph is not None:
        expected_names = (graph[0][0], graph[1][0])
    expected_dims = (tuple(spec.input_shape), tuple(spec.output_shape))
    for tensor, name, dims, role in ((config.input[0], expected_names[0], expected_dims[0], "input"),
                                     (config.output[0], expected_names[1], expected_dims[1], "output")):
        if tensor.name != name:
            problems.append(f"{where}: {role} is named '{tensor.name}' but the model's is '{name}'")
        if tensor.data_type != types.TYPE_FP32:
            problems.append(f"{where}: {role} '{tensor.name}' is {types.DataType.Name(tensor.data_type)}, the model's is TYPE_FP32")
        if tuple(tensor.dims) != dims:
            batch_in = len(tensor.dims) == len(dims) + 1 and tuple(tensor.dims[1:]) == dims
            problems.append(f"{where}: {role} '{tensor.name}' dims {list(tensor.dims)} should be {list(dims)}"
                            + (" (the batch dimension is left out of dims when max_batch_size > 0)" if batch_in else ""))
    others = zip(config.output[1:], other_output_names(ONNX_PLATFORM if standin else config.platform, spec), spec.other_outputs)
    for tensor, name, (_, dims) in others:
        if (tensor.name, tuple(tensor.dims), tensor.data_type) != (name, tuple(dims), types.TYPE_FP32):
            problems.append(f"{where}: output '{tensor.name}' should be '{name}', TYPE_FP32, dims {list(dims)}")
    if graph is not None:
        for (name, dims), want in zip(graph, expected_dims):
            if tuple(dims) != want:
                problems.append(f"{served.model_file.name}: '{name}' has dims {list(dims)} after the batch, its spec says {list(want)}")
    label_file = config.output[0].label_filename
    if label_file != LABELS_FILE:
        problems.append(f"{where}: output label_filename is '{label_file}', expected '{LABELS_FILE}' (Triton's classification needs it)")
    elif served.labels != tuple(spec.class_names):
        problems.append(f"{served.name}/{LABELS_FILE}: {len(served.labels)} labels"
                        + (" that differ from" if len(served.labels) == len(spec.class_names) else " for")
                        + f" the model's {len(spec.class_names)} classes")
    carried = served_spec(config)
    if carried is not None and (carried.class_names, carried.input_shape) != (spec.class_names, spec.input_shape):
        problems.append(f"{where}: parameter {SPEC_PARAMETER} describes another model (classes or input shape differ)")
    return problems


def recorded_problems(served: Served, spec: ModelSpec, settings, config: bytes, labels: bytes) -> list[str]:
    """What in one served model differs from what fcx export writes for `spec` with the TritonSettings recorded at
    export time, byte for byte: its folder name, config.pbtxt (`config`, its bytes) and labels.txt (`labels`)."""
    platform = {settings.name: ONNX_PLATFORM, settings.name + TORCHSCRIPT_SUFFIX: LIBTORCH_PLATFORM}.get(served.name)
    if platform is None:
        return [f"{served.name}: not a model fcx export writes with the recorded settings (model name '{settings.name}')"]
    expected = model_config(served.name, platform, spec, settings)
    problems = []
    if config != config_text(expected).encode():
        differ = field_differences(served.config, expected)
        what = f"{differ} differ" if differ else "its text differs (comments, order or layout)"
        problems.append(f"{served.name}/{CONFIG_FILE} is not what fcx export writes with the settings it recorded "
                        f"(max batch {settings.max_batch_size}, {settings.instances} x {'GPU' if settings.gpu else 'CPU'}): "
                        f"{what}; export it again rather than editing it")
    if labels != labels_text(spec).encode():
        problems.append(f"{served.name}/{LABELS_FILE} is not the model's class names, one a line, as fcx export writes them")
    return problems


def unexpected_fields(served: Served, spec: ModelSpec) -> list[str]:
    """For a repository with no recorded settings (no manifest beside it): a config is what fcx export writes for this
    model with some TritonSettings, or it is refused: any other field (a parameter such as the python backend's
    EXECUTION_ENV_PATH, which runs a script; warm-up files; repository agents; another version policy; a million
    instances) reaches the server otherwise."""
    config = served.config
    groups = config.instance_group
    base = served.name.removesuffix(TORCHSCRIPT_SUFFIX) if config.platform == LIBTORCH_PLATFORM else served.name
    try:
        settings = TritonSettings(base, config.max_batch_size, groups[0].count if len(groups) == 1 else 0,
                                  len(groups) == 1 and groups[0].kind == groups[0].KIND_GPU)
    except FcxError as exc:
        return [f"{served.name}/{CONFIG_FILE}: {exc}"]
    differ = field_differences(config, model_config(served.name, config.platform, spec, settings))
    return [f"{served.name}/{CONFIG_FILE}: {differ} not as fcx export writes them; export it again rather than editing it"] if differ else []


def field_differences(config, expected) -> str:
    """The fields of a ModelConfig that differ from `expected` (and the parameters it has that export does not
    write), or '' when every field is the same."""
    found = {d.name: v for d, v in config.ListFields()}
    wanted = {d.name: v for d, v in expected.ListFields()}
    differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    extra = sorted(set(config.parameters) - set(expected.parameters))
    return ", ".join(differ) + (f" (parameters it does not write: {', '.join(k[:40] for k in extra[:5])})" if extra else "")
