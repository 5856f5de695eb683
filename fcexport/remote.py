"""A served model over the KServe v2 protocol (HTTP or gRPC, chosen by the URL's scheme) as a Predictor: what
`fcx verify --url` and `fcx predict --url` run. Torch-free.

Everything a server sends is bounded before it is read and checked before use: each request has one deadline
covering connecting, sending, the headers and the body, and the command as a whole has another (`Deadline`);
an answer's size is checked against what the request can return (HTTP: the standard
library's client, reading at most that; gRPC: tritonclient with a capped message size); the config goes through
Triton's schema, the spec it carries through the spec codec, every output's shape against the spec.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec
from fcexport.targets import MODEL_NAME, Predictor

PROTOCOLS = {"http": "http", "https": "http", "grpc": "grpc"}
TIMEOUT_SECONDS = 30.0  # for each request as a whole: a server that answers a byte at a time is cut off too
COMMAND_TIMEOUT_SECONDS = 300.0  # for everything one command asks of servers, unless the caller gives another
MAX_LABEL_BYTES = 1 << 10
MAX_MESSAGE_BYTES = 256 << 20  # the largest answer read (a 4096-image batch of 16k-class float32 logits)
MAX_JSON_BYTES = 4 << 20  # configs, statistics, indexes, classification answers


@dataclass(frozen=True)
class Deadline:
    """When a whole command must be done with servers (on time.monotonic()'s clock): each request gets the shorter
    of TIMEOUT_SECONDS and what is left, so a server that answers every request just in time still ends it."""

    seconds: float
    ends: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        if not 0 < seconds < float("inf"):
            raise FcxError(f"a command's deadline must be a positive number of seconds, got {seconds}")
        return cls(seconds, time.monotonic() + seconds)

    def budget(self, where: str, what: str) -> tuple[float, bool]:
        """(seconds the next request may take, whether this deadline rather than TIMEOUT_SECONDS limits it); once it
        has passed, the FcxError that says so."""
        left = self.ends - time.monotonic()
        if left <= 0:
            raise self.ran_out(where, what)
        return min(TIMEOUT_SECONDS, left), left < TIMEOUT_SECONDS

    def ran_out(self, where: str, what: str) -> FcxError:
        return FcxError(f"{where}: the command's overall deadline of {self.seconds:g} s ran out before the server "
                        f"answered to {what}", hint="timeout")


@dataclass(frozen=True)
class Endpoint:
    """One model on a server: where, how, a client for it (_HttpClient or _GrpcClient) and its config (ModelConfig)."""

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


def connect(url: str, model: str | None, deadline: Deadline | None = None) -> Endpoint:
    """The model `model` at `url` (http://HOST:PORT, https://..., grpc://HOST:PORT), ready, with its config;
    `model` None: the one model the server serves. Every request made through it, these first ones included, ends by
    `deadline` (default: COMMAND_TIMEOUT_SECONDS from now)."""
    from google.protobuf import json_format

    from fcexport.triton_config import schema

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in PROTOCOLS or not parts.hostname or parts.path not in ("", "/"):
        raise FcxError(f"--url {url!r}: expected http://HOST:PORT or grpc://HOST:PORT (KServe v2 over HTTP or gRPC)")
    if model is not None and not MODEL_NAME.fullmatch(model):
        raise FcxError(f"model name {model[:100]!r}: letters, digits, '_', '.' and '-' only (as fcx export --name writes)")
    try:
        port = parts.port
    except ValueError as exc:
        raise FcxError(f"--url {url!r}: {exc}") from exc
    protocol = PROTOCOLS[parts.scheme]
    port = port or (8001 if protocol == "grpc" else 8000)
    deadline = deadline or Deadline.after(COMMAND_TIMEOUT_SECONDS)
    client = (_GrpcClient(parts.hostname, port, url, deadline) if protocol == "grpc"
              else _HttpClient(parts.hostname, port, parts.scheme == "https", url, deadline))
    if model is None:
        served = client.model_names()
        if len(served) != 1:
            raise FcxError(f"{url}: serves {', '.join(served) or 'no model'}; say which with --model NAME")
        model = served[0]
    where = client.where = f"{url} model {model}"
    if not client.is_model_ready(model):
        raise FcxError(f"{where}: no such model is ready there; it serves {', '.join(client.model_names()) or 'none'} (--model NAME)")
    try:
        config = json_format.ParseDict(client.model_config(model), schema().ModelConfig(), ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, AttributeError, ValueError) as exc:
        raise FcxError(f"{where}: the configuration it sent is not Triton's ({str(exc)[:200]})") from exc
    if len(config.input) != 1 or not config.output:
        raise FcxError(f"{where}: the model has {len(config.input)} inputs and {len(config.output)} outputs; an fcexport model has "
                       "1 input and its logits first")
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


def infer(endpoint: Endpoint, x: np.ndarray, class_count: int = 0) -> np.ndarray:
    """One request: float32 logits for the batch `x`, or with `class_count` Triton's classification strings
    ("score:index:label", an array of bytes) for the top classes. The server's refusal (shape, batch size) is a
    one-line FcxError."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    per_image = max(1, int(np.prod(endpoint.config.output[0].dims)))  # what one image can return
    limit = len(x) * per_image * (MAX_LABEL_BYTES if class_count else 4) + MAX_JSON_BYTES
    return endpoint.client.infer(endpoint.model, endpoint.input_name, endpoint.output_name, x, class_count,
                                 min(limit, MAX_MESSAGE_BYTES))


def remote_predictor(endpoint: Endpoint, spec: ModelSpec) -> Predictor:
    """The endpoint as a Predictor (batches split to the served max_batch_size)."""

    def run(x: np.ndarray) -> np.ndarray:
        logits = infer(endpoint, x)
        if logits.dtype != np.float32:
            raise FcxError(f"{endpoint.where()}: returned {logits.dtype} logits, expected float32")
        return logits

    batch = endpoint.config.max_batch_size if endpoint.config.max_batch_size > 0 else 256
    return Predictor(f"triton-{endpoint.protocol}", endpoint.device, endpoint.where(), run, spec, batch, logits_only=True)


def label_problems(endpoint: Endpoint, spec: ModelSpec, x: np.ndarray) -> list[str]:
    """What is wrong with the labels Triton's classification returns: every class is asked for on one input and
    must carry model.pt's name, and the top-1 labels of `x` must name the class its logits rank first. (A segmentation
    model's labels are its labels.txt's, checked with the configuration: the classification extension ranks the whole
    flattened output, not the classes of one pixel.)"""
    if spec.dense:
        return []
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
    return problems


def statistics(endpoint: Endpoint) -> dict[int, int]:
    """Batch size -> how many times the server ran a batch of that size for this model (Triton's statistics)."""
    counts = {}
    try:
        for model in endpoint.client.statistics(endpoint.model).get("model_stats", []):
            for batch in model.get("batch_stats", []):
                size = int(batch["batch_size"])
                counts[size] = counts.get(size, 0) + int(batch["compute_infer"]["count"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FcxError(f"{endpoint.where()}: its statistics are not Triton's ({str(exc)[:100]})") from exc
    return counts


def _parse_class(item, count: int, endpoint: Endpoint) -> tuple[int, str]:
    text = (item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item))[:MAX_LABEL_BYTES]
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) >= count:
        raise FcxError(f"{endpoint.where()}: the classification answer {text[:80]!r} is not score:index:label")
    return int(parts[1]), parts[2] if len(parts) == 3 else ""


def _slow(where: str, what: str, deadline: Deadline, overall: bool) -> FcxError:
    """A request cut off: by the command's deadline (`overall`) or by its own TIMEOUT_SECONDS."""
    if overall:
        return deadline.ran_out(where, what)
    return FcxError(f"{where}: no whole answer within {TIMEOUT_SECONDS:g} s to {what}; the server is reachable but too slow")


def _unreachable(where: str, what: str, why: str) -> FcxError:
    return FcxError(f"{where}: cannot reach the server to {what} ({why[:200]}); is fcx serve running there?")


class _HttpClient:
    """KServe v2 over HTTP with the standard library: one connection per request, one deadline for all of it, an
    answer read only up to the size the request can have (tritonclient's HTTP client reads any body whole, and is
    bound to the thread that made it)."""

    def __init__(self, host: str, port: int, tls: bool, where: str, deadline: Deadline):
        self.host, self.port, self.tls, self.where, self.deadline = host, port, tls, where, deadline

    def is_model_ready(self, model: str) -> bool:
        status, _, _ = self._request("GET", f"/v2/models/{model}/ready", None, {}, MAX_JSON_BYTES, "ask whether the model is ready")
        return status == 200

    def model_names(self) -> list[str]:
        """The ready models, from the statistics of all of them (the repository index needs the repository's
        folder, which fcx serve removes once loaded)."""
        stats = self._json("GET", "/v2/models/stats", None, "list its models")
        return sorted({str(m.get("name", "?")) for m in stats.get("model_stats", []) if isinstance(m, dict)}) if isinstance(stats, dict) else []

    def model_config(self, model: str) -> dict:
        return self._json("GET", f"/v2/models/{model}/config", None, "read the model's configuration")

    def statistics(self, model: str) -> dict:
        return self._json("GET", f"/v2/models/{model}/stats", None, "read statistics")

    def infer(self, model: str, input_name: str, output_name: str, x: np.ndarray, class_count: int, limit: int) -> np.ndarray:
        output = {"name": output_name, "parameters": {"classification": class_count} if class_count else {"binary_data": True}}
        header = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}], "outputs": [output]}).encode()
        what = f"run a batch of {len(x)}"
        status, body, split = self._request("POST", f"/v2/models/{model}/infer", header + x.tobytes(),
                                            {"Inference-Header-Content-Length": str(len(header)),
                                             "Content-Type": "application/octet-stream"}, limit, what)
        try:
            answer = json.loads(body[:split] if split is not None else body)
            if status != 200:
                raise FcxError(f"{self.where}: the server refused to {what}: {' '.join(str(answer.get('error', answer)).split())[:400]}")
            (found,) = [o for o in answer["outputs"] if o.get("name") == output_name]
            shape = [int(d) for d in found["shape"]]
            if class_count:
                return np.array([s.encode() for s in found["data"]], dtype=object).reshape(shape)
            data = body[split:] if split is not None else np.asarray(found["data"], dtype=np.float32).tobytes()
            if found.get("datatype") != "FP32" or len(data) != 4 * int(np.prod(shape)):
                raise ValueError(f"{found.get('datatype')} {shape} in {len(data)} bytes")
            return np.frombuffer(data, dtype=np.float32).reshape(shape)
        except FcxError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FcxError(f"{self.where}: the answer to a batch of {len(x)} is malformed ({str(exc)[:120]})") from exc

    def _json(self, method: str, path: str, payload, what: str):
        body = json.dumps(payload).encode() if payload is not None else None
        status, data, _ = self._request(method, path, body, {"Content-Type": "application/json"}, MAX_JSON_BYTES, what)
        try:
            found = json.loads(data)
        except ValueError as exc:
            raise FcxError(f"{self.where}: its answer to {what} is not JSON") from exc
        if status != 200:
            message = found.get("error", found) if isinstance(found, dict) else found
            raise FcxError(f"{self.where}: the server refused to {what}: {' '.join(str(message).split())[:400]}")
        return found

    def _request(self, method: str, path: str, body: bytes | None, headers: dict, limit: int, what: str):
        """(status, body, the length of its JSON header when binary data follows, or None), all within one deadline
        (Deadline.budget): connecting is bounded by the socket's timeout, then a timer shuts the socket when the
        deadline passes, which ends any read, the status line and headers included (a socket timeout alone only
        bounds each wait, and a server sending a byte a second never makes one wait long). A body larger than
        `limit` is refused before it is read."""
        import http.client
        import socket

        seconds, overall = self.deadline.budget(self.where, what)
        started = time.monotonic()
        kind = http.client.HTTPSConnection if self.tls else http.client.HTTPConnection
        connection = kind(self.host, self.port, timeout=seconds)
        expired = threading.Event()
        timer = None
        try:
            connection.connect()
            sock = connection.sock  # kept: the connection lets go of it once a closing response is read

            def cut() -> None:
                expired.set()
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed: the request is over
                    pass

            timer = threading.Timer(max(0.0, seconds - (time.monotonic() - started)), cut)
            timer.daemon = True
            timer.start()
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            size = response.getheader("Content-Length")
            if size is None or not size.isdigit() or int(size) > limit:
                raise FcxError(f"{self.where}: its answer to {what} declares {size or 'no'} bytes"
                               f"{'' if size is None else f' (at most {limit:,} expected)'}; not read")
            header = response.getheader("Inference-Header-Content-Length")
            split = int(header) if header and header.isdigit() and int(header) <= int(size) else None
            chunks, left = [], int(size)
            while left:
                chunk = response.read1(min(left, 1 << 20))
                if not chunk:
                    raise FcxError(f"{self.where}: its answer to {what} ended early")
                chunks.append(chunk)
                left -= len(chunk)
            return response.status, b"".join(chunks), split
        except (FcxError, OSError, http.client.HTTPException) as exc:  # socket.timeout is an OSError
            if expired.is_set() or isinstance(exc, TimeoutError):  # the cut socket ended the read, not the server
                raise _slow(self.where, what, self.deadline, overall) from exc
            if isinstance(exc, FcxError):
                raise
            if isinstance(exc, http.client.BadStatusLine):  # binary framing: an HTTP/2 (gRPC) port
                raise FcxError(f"{self.where}: this port does not answer HTTP/1.1 (a gRPC port?); for gRPC use "
                               f"grpc://{self.host}:{self.port}, for HTTP the server's HTTP port") from exc
            raise _unreachable(self.where, what, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if timer is not None:
                timer.cancel()
            connection.close()


class _GrpcClient:
    """KServe v2 over gRPC with tritonclient: a deadline on every call, answers capped at MAX_MESSAGE_BYTES."""

    def __init__(self, host: str, port: int, where: str, deadline: Deadline):
        import tritonclient.grpc as grpc

        self.grpc, self.where, self.address, self.deadline = grpc, where, f"{host}:{port}", deadline
        self.client = grpc.InferenceServerClient(self.address, channel_args=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])

    def is_model_ready(self, model: str) -> bool:
        return self._call(lambda t: self.client.is_model_ready(model, client_timeout=t), "ask whether the model is ready")

    def model_names(self) -> list[str]:
        found = self._call(lambda t: self.client.get_inference_statistics("", as_json=True, client_timeout=t), "list its models")
        return sorted({m.get("name", "?") for m in found.get("model_stats", [])})

    def model_config(self, model: str) -> dict:
        found = self._call(lambda t: self.client.get_model_config(model, as_json=True, client_timeout=t), "read the model's configuration")
        return found.get("config", {})

    def statistics(self, model: str) -> dict:
        return self._call(lambda t: self.client.get_inference_statistics(model, as_json=True, client_timeout=t), "read statistics")

    def infer(self, model: str, input_name: str, output_name: str, x: np.ndarray, class_count: int, limit: int) -> np.ndarray:
        tensor = self.grpc.InferInput(input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wanted = self.grpc.InferRequestedOutput(output_name, class_count=class_count)
        what = f"run a batch of {len(x)}"
        answer = self._call(lambda t: self.client.infer(model, [tensor], outputs=[wanted], client_timeout=t), what)
        try:
            out = answer.as_numpy(output_name)
        except (ValueError, TypeError) as exc:  # a declared shape its data does not fill
            raise FcxError(f"{self.where}: the answer to a batch of {len(x)} is malformed ({str(exc)[:120]})") from exc
        if out is None:
            raise FcxError(f"{self.where}: the answer holds no '{output_name}' output")
        return out

    def _call(self, request, what: str):
        from tritonclient.utils import InferenceServerException

        seconds, overall = self.deadline.budget(self.where, what)
        try:
            return request(seconds)  # gRPC's deadline covers the whole call
        except InferenceServerException as exc:
            message = " ".join((exc.message() or str(exc)).split())
            lower = message.lower()
            if "deadline" in lower or "timed out" in lower:
                raise _slow(self.where, what, self.deadline, overall) from exc
            if "socket closed" in lower or "http/1" in lower:  # an HTTP/1.1 server closes a gRPC connection
                raise FcxError(f"{self.where}: this port does not answer gRPC (an HTTP port?); for HTTP use "
                               f"http://{self.address}, for gRPC the server's gRPC port") from exc
            if "failed to connect" in lower or "connection refused" in lower or "unavailable" in lower:
                raise _unreachable(self.where, what, message) from exc
            raise FcxError(f"{self.where}: the server refused to {what}: {message[:400]}") from exc
