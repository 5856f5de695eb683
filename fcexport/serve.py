"""fcx serve: the real tritonserver on 127.0.0.1, stopped cleanly, leaving nothing behind.

The server is the one in the nvidia-pytriton wheel, installed in its own environment (Triton's python backend needs
numpy < 2 there; fcx itself uses numpy 2): `make serve-env` makes `.venv-triton`, or point `$FCX_TRITON_ENV` at one.
That build has the python backend only, so each onnxruntime_onnx model is served by a stand-in copy (its config with
the platform line swapped for the python backend, and fcexport/triton_standin.py running the same model.onnx in
onnxruntime); what is served is written to a private folder that is removed once the models are loaded. The server
runs in its own session (a Ctrl-C meant for fcx does not reach it half-way) and gets SIGTERM when fcx dies, however
it dies; its shared-memory regions carry fcx's pid, and leftovers of dead runs are removed at the next start.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.files import process_exists

ENV_VARIABLE = "FCX_TRITON_ENV"
DEFAULT_ENV = Path(__file__).resolve().parents[1] / ".venv-triton"  # made by `make serve-env` in a source checkout
HTTP_PORT, GRPC_PORT = 8000, 8001
READY_SECONDS = 120.0
EXIT_SECONDS = 5  # Triton's --exit-timeout-secs: in-flight requests get this long at shutdown
TEMP_PREFIX, SHM_PREFIX = "fcx-serve-", "fcxserve-"
SHM = Path("/dev/shm")
STANDIN_NOTE = ("the onnxruntime backend is not in this build, so each onnxruntime_onnx model runs in Triton's python "
                "backend: a stand-in that runs the same model.onnx in onnxruntime")
# Run in the server's environment: what it has (one process start, no import of the packages themselves).
PROBE = """import json, sys, sysconfig, importlib.metadata as m, importlib.util as u
found = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "libdir": sysconfig.get_config_var("LIBDIR"),
         "ldlibrary": sysconfig.get_config_var("LDLIBRARY")}
for name in ("numpy", "onnxruntime", "nvidia-pytriton"):
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        found[name] = None
spec = u.find_spec("pytriton")
found["pytriton"] = list(spec.submodule_search_locations)[0] if spec else None
print(json.dumps(found))
"""
_runs = itertools.count()


@dataclass(frozen=True)
class ServerEnv:
    """Where tritonserver and what it needs live: the environment's python (the python backend's stub embeds an
    interpreter that finds the environment through PATH), the binary, the python backend, the stub for that python,
    and the libraries the stub and backend link against."""

    root: Path
    tritonserver: Path
    backend: Path
    stub: Path
    libraries: tuple[str, ...]
    versions: dict = field(default_factory=dict)


def find_server_env(root: Path | None = None) -> ServerEnv:
    """The server's environment: `root`, else $FCX_TRITON_ENV, else .venv-triton in the source checkout; checked."""
    root = Path(root or os.environ.get(ENV_VARIABLE) or DEFAULT_ENV)
    python = root / "bin" / "python"
    if not python.is_file():
        raise FcxError(f"{root}: no server environment here (tritonserver runs from its own venv)", hint="serve-env")
    try:
        probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
        found = json.loads(probe.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise FcxError(f"{python}: cannot ask the server environment what it holds ({type(exc).__name__})", hint="serve-env") from exc
    for package in ("nvidia-pytriton", "numpy", "onnxruntime"):
        if not found.get(package):
            raise FcxError(f"{root}: {package} is not installed in the server environment", hint="serve-env")
    if int(found["numpy"].split(".")[0]) >= 2:
        raise FcxError(f"{root}: numpy {found['numpy']} in the server environment; Triton's python backend needs numpy < 2 "
                       "(with 2.x every output comes back empty)", hint="serve-env")
    dist = Path(found["pytriton"]) / "tritonserver"
    stub = dist / "python_backend_stubs" / found["python"] / "triton_python_backend_stub"
    binary, backend = dist / "bin" / "tritonserver", dist / "backends" / "python"
    for needed in (binary, backend / "libtriton_python.so", stub):
        if not needed.is_file():
            raise FcxError(f"{needed}: missing from nvidia-pytriton {found['nvidia-pytriton']} (python {found['python']})", hint="serve-env")
    libraries = [str(Path(found["pytriton"]).parent / "nvidia_pytriton.libs")]
    if found.get("libdir") and found.get("ldlibrary") and (Path(found["libdir"]) / found["ldlibrary"]).exists():
        libraries.insert(0, found["libdir"])  # a pyenv interpreter's libpython: the stub links against it
    versions = {k: found[k] for k in ("python", "numpy", "onnxruntime", "nvidia-pytriton")}
    return ServerEnv(root, binary, backend, stub, tuple(libraries), versions)


@dataclass(frozen=True)
class ServedModel:
    """What fcx serve is given for one model: its folder name, checked config (a ModelConfig), labels and file."""

    name: str
    config: object
    labels: bytes
    data: bytes


def standin_repository(models: list[ServedModel], folder: Path) -> dict[str, str]:
    """Write the repository the server loads: each onnxruntime_onnx model as a python-backend stand-in (CPU
    instances: this build has no GPU backends). Returns the models not served, with why."""
    from fcexport.files import write_bytes_atomic, write_text_atomic
    from fcexport.triton_config import CONFIG_FILE, LABELS_FILE, ONNX_PLATFORM, VERSION, config_text

    standin = (Path(__file__).parent / "triton_standin.py").read_bytes()
    left = {}
    for model in models:
        if model.config.platform != ONNX_PLATFORM:
            left[model.name] = f"{model.config.platform or model.config.backend}: this tritonserver build has the python backend only"
            continue
        config = type(model.config)()
        config.CopyFrom(model.config)
        config.platform, config.backend, config.default_model_filename = "", "python", ""
        for group in config.instance_group:
            if group.kind == group.KIND_GPU:
                left[f"{model.name} on GPU"] = "served with CPU instances: this tritonserver build has no GPU backends"
            group.kind = group.KIND_CPU
        target = folder / model.name
        (target / VERSION).mkdir(parents=True)
        write_text_atomic(target / CONFIG_FILE, config_text(config))
        write_bytes_atomic(target / LABELS_FILE, model.labels)
        write_bytes_atomic(target / VERSION / "model.onnx", model.data)
        write_bytes_atomic(target / VERSION / "model.py", standin)
    return left


@dataclass
class Running:
    """A started server: where it answers, what it serves, what it left out and why."""

    http_url: str
    grpc_url: str
    models: tuple[str, ...]
    left: dict[str, str]
    version: str
    process: subprocess.Popen
    log: collections.deque

    def alive(self) -> bool:
        return self.process.poll() is None

    def last_log(self, lines: int = 5) -> str:
        return " | ".join(line.strip() for line in list(self.log)[-lines:] if line.strip())


@contextlib.contextmanager
def running_server(env: ServerEnv, models: list[ServedModel], http_port: int = HTTP_PORT, grpc_port: int = GRPC_PORT,
                   ready_seconds: float = READY_SECONDS) -> Iterator[Running]:
    """tritonserver on 127.0.0.1 serving `models`, ready when this yields; stopped (SIGTERM, then SIGKILL after
    EXIT_SECONDS more), its shared memory removed, when the block ends, however it ends."""
    remove_leftovers()
    for port in dict.fromkeys((http_port, grpc_port)):
        check_port_free(port)
    if http_port == grpc_port:
        raise FcxError(f"the HTTP and gRPC ports must differ (both {http_port})")
    run = f"{os.getpid()}-{next(_runs)}"
    work = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{run}-"))
    process = None
    try:
        left = standin_repository(models, work / "models")
        served = tuple(m.name for m in models if m.name not in left)
        if not served:
            raise FcxError("no model in the repository can be served here: " + "; ".join(f"{k}: {v}" for k, v in left.items()))
        backend = work / "backends" / "python"
        shutil.copytree(env.backend, backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(env.stub, backend / "triton_python_backend_stub")
        command = [str(env.tritonserver), f"--model-repository={work / 'models'}", f"--backend-directory={work / 'backends'}",
                   "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",  # every address given: it binds 0.0.0.0 otherwise
                   f"--http-port={http_port}", f"--grpc-port={grpc_port}", "--allow-metrics=false",
                   "--model-control-mode=none", "--strict-readiness=true", f"--exit-timeout-secs={EXIT_SECONDS}",
                   f"--backend-config=python,shm-region-prefix-name={SHM_PREFIX}{run}-", "--log-info=false"]
        variables = dict(os.environ)
        variables["PATH"] = f"{env.root / 'bin'}{os.pathsep}{variables.get('PATH', '')}"  # the stub finds the env's python
        variables["LD_LIBRARY_PATH"] = os.pathsep.join([*env.libraries, *filter(None, [variables.get("LD_LIBRARY_PATH")])])
        variables.pop("PYTHONPATH", None)
        process = subprocess.Popen(command, env=variables, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        log = collections.deque(maxlen=200)
        threading.Thread(target=_collect, args=(process.stdout, log), daemon=True).start()
        url = f"http://127.0.0.1:{http_port}"
        version = _wait_ready(process, url, served, log, ready_seconds)
        shutil.rmtree(work, ignore_errors=True)  # loaded: nothing of it is read again
        yield Running(url, f"grpc://127.0.0.1:{grpc_port}", served, left, version, process, log)
    finally:
        if process is not None:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
        _remove_shm(f"{SHM_PREFIX}{run}-")


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL to its whole session if it has not exited after Triton's own exit timeout."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(EXIT_SECONDS + 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # stubs it started share its session
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


def check_port_free(port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise FcxError(f"port must be from 1 to 65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no listener
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise FcxError(f"port {port} on 127.0.0.1 is in use ({exc.strerror}); choose another with --http-port / --grpc-port") from exc


def free_port() -> int:
    """A port nothing listens on now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def remove_leftovers() -> None:
    """Private folders and shared-memory regions of fcx serve runs whose process no longer exists."""
    for path in [*Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"), *(SHM.glob(f"{SHM_PREFIX}*") if SHM.is_dir() else [])]:
        pid = path.name.split("-")[2] if path.name.startswith(TEMP_PREFIX) else path.name.split("-")[1]
        if pid.isdigit() and not process_exists(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()


def _remove_shm(prefix: str) -> None:
    for path in SHM.glob(f"{prefix}*") if SHM.is_dir() else []:
        with contextlib.suppress(OSError):
            path.unlink()


def _die_with_parent(parent: int):
    """A preexec function: the child gets SIGTERM when the thread that started it dies (prctl PR_SET_PDEATHSIG), so
    a killed fcx does not leave tritonserver running; if fcx is already gone, the child ends at once."""

    def arm() -> None:
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _collect(stream, log: collections.deque) -> None:
    for line in iter(stream.readline, b""):
        log.append(line.decode("utf-8", "replace"))
    stream.close()


def _wait_ready(process: subprocess.Popen, url: str, models: tuple[str, ...], log, seconds: float) -> str:
    """Poll until the server says it and every model are ready; the server's version. A server that exits or
    takes too long is an error with its last log lines."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            time.sleep(0.1)  # the log thread reads what it printed last
            errors = [line.strip() for line in log if line[:1] in "EW" or "error" in line.lower()] or list(log)
            raise FcxError(f"tritonserver exited with code {process.returncode} before it was ready: "
                           + " | ".join(errors[-4:])[:1500])
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as answer:
                if answer.status == 200 and all(_ready(url, m) for m in models):
                    with urllib.request.urlopen(f"{url}/v2", timeout=2) as about:
                        return str(json.loads(about.read(1 << 16)).get("version", "?"))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise FcxError(f"tritonserver was not ready after {seconds:.0f} s: {' | '.join(list(log)[-4:])[:1500]}")


def _ready(url: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{urllib.parse.quote(model, safe='')}/ready", timeout=1) as answer:
            return answer.status == 200
    except urllib.error.URLError:
        return False
