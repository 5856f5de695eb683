"""A served model over the KServe v2 protocol (HTTP or gRPC, chosen by the URL's scheme) as a Predictor: what
`fcx verify --url` and `fcx predict --url` run. tritonclient speaks the protocol (imported when used; it needs no
torch). Everything the server sends is bounded or checked before use: its config through Triton's schema, the spec
it carries through the spec codec, every output's shape against the spec.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
import numpy as np

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec
from fcexport.targets import Predictor

PROTOCOLS = {"http": "http", "https": "http", "grpc": "grpc"}
TIMEOUT_SECONDS = 30.0  # for each request as a whole: a server that answers a byte at a time is cut off too
MAX_LABEL_BYTES = 1 << 10
MAX_MESSAGE_BYTES = 256 << 20  # gRPC refuses larger answers before allocating them


@dataclass(frozen=True)
class Endpoint:
    """One model on a server: where, how, its config (a ModelConfig) and the spec it carries (or None)."""

    url: str
    protocol: str
    model: str
    client: object
    config: object

    @property
    def input_name(self) -> str:
        return self.config.input[0].name

    @property
    def output_name(self) -> str:
        return self.config.output[0].name

    @property
    def device(self) -> str:
        groups = self.config.instance_group
        return "cuda" if groups and all(g.kind == g.KIND_GPU for g in groups) else "cpu"

    def where(self) -> str:
        return f"{self.url} model {self.model}"


def connect(url: str, model: str) -> Endpoint:
    """The model `model` at `url` (http://HOST:PORT, https://..., grpc://HOST:PORT), ready, with its config."""
    from google.protobuf import json_format

    from fcexport.triton_config import schema

    from fcexport.targets import MODEL_NAME

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in PROTOCOLS or not parts.hostname or parts.path not in ("", "/"):
        raise FcxError(f"--url {url!r}: expected http://HOST:PORT or grpc://HOST:PORT (KServe v2 over HTTP or gRPC)")
    if not MODEL_NAME.fullmatch(model):
        raise FcxError(f"model name {model[:100]!r}: letters, digits, '_', '.' and '-' only (as fcx export --name writes)")
    try:
        port = parts.port
    except ValueError as exc:
        raise FcxError(f"--url {url!r}: {exc}") from exc
    protocol = PROTOCOLS[parts.scheme]
    address = f"{parts.hostname}:{port or (8001 if protocol == 'grpc' else 8000)}"
    if protocol == "grpc":
        import tritonclient.grpc as client_module

        client = client_module.InferenceServerClient(address, channel_args=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    else:
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(address, ssl=parts.scheme == "https", network_timeout=TIMEOUT_SECONDS,
                                                      connection_timeout=TIMEOUT_SECONDS)
    where = f"{url} model {model}"
    ready = _call(protocol, lambda **t: client.is_model_ready(model, **t), where, "ask whether the model is ready")
    if not ready:
        try:
            names = ", ".join(_call(protocol, lambda **t: _model_names(client, protocol, t), where, "list its models")) or "none"
        except FcxError:  # fcx serve removes its repository folder once loaded, so the index is not there to list
            names = "the names it printed when it started"
        raise FcxError(f"{where}: no such model is ready there; it serves {names} (--model NAME)")
    if protocol == "grpc":
        config = _call(protocol, lambda **t: client.get_model_config(model, **t).config, where, "read the model's configuration")
    else:
        found = _call(protocol, lambda **t: client.get_model_config(model), where, "read the model's configuration")
        try:
            config = json_format.ParseDict(found, schema().ModelConfig(), ignore_unknown_fields=True)
        except (json_format.ParseError, TypeError, AttributeError) as exc:
            raise FcxError(f"{where}: the configuration it sent is not Triton's ({str(exc)[:200]})") from exc
    if len(config.input) != 1 or len(config.output) != 1:
        raise FcxError(f"{where}: the model has {len(config.input)} inputs and {len(config.output)} outputs; an fcexport classifier has 1 and 1")
    return Endpoint(url, protocol, model, client, config)


def served_spec(endpoint: Endpoint) -> ModelSpec:
    """The spec the served config carries (fcx export --triton puts it there)."""
    from fcexport.triton_config import SPEC_PARAMETER, served_spec as spec_of

    try:
        spec = spec_of(endpoint.config)
    except FcxError as exc:
        raise FcxError(f"{endpoint.where()}: {exc}") from exc
    if spec is None:
        raise FcxError(f"{endpoint.where()}: its configuration has no {SPEC_PARAMETER} parameter, so how to prepare images "
                       "for it is unknown; serve a repository written by fcx export --triton")
    return spec


def infer(endpoint: Endpoint, x: np.ndarray, class_count: int = 0):
    """One request: logits for the batch `x`, or with `class_count` Triton's classification strings
    ("score:index:label") for the top classes. The server's refusal (shape, batch size) is a one-line FcxError."""
    module = _module(endpoint)
    tensor = module.InferInput(endpoint.input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    wanted = module.InferRequestedOutput(endpoint.output_name, class_count=class_count)
    answer = _call(endpoint.protocol, lambda **t: endpoint.client.infer(endpoint.model, [tensor], outputs=[wanted], **t),
                   endpoint.where(), f"run a batch of {len(x)}")
    try:
        out = answer.as_numpy(endpoint.output_name)
    except (ValueError, TypeError) as exc:  # a declared shape its data does not fill
        raise FcxError(f"{endpoint.where()}: the answer to a batch of {len(x)} is malformed ({str(exc)[:120]})") from exc
    if out is None:
        raise FcxError(f"{endpoint.where()}: the answer holds no '{endpoint.output_name}' output")
    return out


def remote_predictor(endpoint: Endpoint, spec: ModelSpec) -> Predictor:
    """The endpoint as a Predictor (batches split to the served max_batch_size)."""

    def run(x: np.ndarray) -> np.ndarray:
        logits = infer(endpoint, x)
        if logits.dtype != np.float32:
            raise FcxError(f"{endpoint.where()}: returned {logits.dtype} logits, expected float32")
        return logits

    batch = endpoint.config.max_batch_size if endpoint.config.max_batch_size > 0 else 256
    return Predictor(f"triton-{endpoint.protocol}", endpoint.device, endpoint.where(), run, spec, batch)


def served_labels(endpoint: Endpoint, spec: ModelSpec, x: np.ndarray) -> tuple[list[str], list[str]]:
    """(the label Triton's classification returns for each class index, in order; problems): every class is
    asked for on one input, and the top-1 labels of `x` must name the class its logits rank first."""
    count = len(spec.class_names)
    labels: dict[int, str] = {}
    problems = []
    for row in np.atleast_2d(infer(endpoint, x[:1], class_count=count)):
        for item in row:
            index, label = _parse_class(item, count, endpoint)
            labels[index] = label
    ordered = [labels.get(i, "") for i in range(count)]
    if len(labels) != count:
        problems.append(f"Triton's classification returned {len(labels)} labels for {count} classes (is labels.txt complete?)")
    elif tuple(ordered) != tuple(spec.class_names):
        first = next(i for i in range(count) if ordered[i] != spec.class_names[i])
        problems.append(f"Triton labels class {first} '{ordered[first]}' but model.pt calls it '{spec.class_names[first]}'")
    top = np.atleast_2d(infer(endpoint, x, class_count=1))
    logits = infer(endpoint, x)
    for i, item in enumerate(top[:, 0]):
        index, _ = _parse_class(item, count, endpoint)
        if index != int(np.argmax(logits[i])):
            problems.append(f"Triton's top-1 class for input {i} is {index}, its logits rank {int(np.argmax(logits[i]))} first")
            break
    return ordered, problems


def statistics(endpoint: Endpoint) -> dict[int, int]:
    """Batch size -> how many times the server ran a batch of that size for this model (Triton's statistics)."""
    from google.protobuf import json_format

    found = _call(endpoint.protocol, lambda **t: endpoint.client.get_inference_statistics(endpoint.model, **t),
                  endpoint.where(), "read statistics")
    if endpoint.protocol == "grpc":
        found = json_format.MessageToDict(found, preserving_proto_field_name=True)
    counts = {}
    for model in found.get("model_stats", []):
        for batch in model.get("batch_stats", []):
            counts[int(batch["batch_size"])] = counts.get(int(batch["batch_size"]), 0) + int(batch["compute_infer"]["count"])
    return counts


def _parse_class(item, count: int, endpoint: Endpoint) -> tuple[int, str]:
    text = (item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item))[:MAX_LABEL_BYTES]
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) >= count:
        raise FcxError(f"{endpoint.where()}: the classification answer {text[:80]!r} is not score:index:label")
    return int(parts[1]), parts[2] if len(parts) == 3 else ""


def _module(endpoint: Endpoint):
    if endpoint.protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def _model_names(client, protocol: str, timeout: dict) -> list[str]:
    index = client.get_model_repository_index(**timeout)
    items = index.models if protocol == "grpc" else index
    return [m.name if protocol == "grpc" else m.get("name", "?") for m in items]


def _call(protocol: str, request, where: str, what: str):
    """Run one client request within TIMEOUT_SECONDS in all (gRPC: its deadline; HTTP: a gevent timeout around
    it, since the HTTP client's own timeout is per read); the server's or the network's error as one line naming
    the endpoint."""
    import gevent
    from tritonclient.utils import InferenceServerException

    slow = f"{where}: no whole answer within {TIMEOUT_SECONDS:.0f} s to {what}; the server is reachable but too slow"
    try:
        if protocol == "grpc":
            return request(client_timeout=TIMEOUT_SECONDS)
        with gevent.Timeout(TIMEOUT_SECONDS):
            return request()
    except gevent.Timeout as exc:
        raise FcxError(slow) from exc
    except InferenceServerException as exc:
        message = " ".join((exc.message() or str(exc)).split())
        lower = message.lower()
        if "deadline" in lower or "timed out" in lower:
            raise FcxError(slow) from exc
        if "failed to connect" in lower or "connection refused" in lower or "unavailable" in lower:
            raise FcxError(f"{where}: cannot reach the server to {what} ({message[:200]}); is fcx serve running there?") from exc
        raise FcxError(f"{where}: the server refused to {what}: {message[:400]}") from exc
    except TimeoutError as exc:
        raise FcxError(slow) from exc
    except (OSError, ConnectionError) as exc:
        raise FcxError(f"{where}: cannot reach the server to {what} ({type(exc).__name__}: {str(exc)[:200]}); "
                       "is fcx serve running there?") from exc
