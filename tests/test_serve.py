"""fcx serve against the real tritonserver on loopback (from nvidia-pytriton, in .venv-triton: `make serve-env`):
fcx verify --url and fcx predict --url over HTTP and gRPC, the server's refusals, dynamic batching in its statistics,
and nothing left behind after SIGTERM or SIGKILL of fcx. `make test` sets FCX_REQUIRE_SERVER, so a missing server
environment fails there instead of skipping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import bounded, invoke

from fcexport import pipeline, remote
from fcexport.errors import FcxError
from fcexport.serve import SHM, SHM_PREFIX, TEMP_PREFIX, find_server_env, free_port

ROOT = Path(__file__).resolve().parents[1]


def _server_env():
    try:
        return find_server_env()
    except FcxError as exc:
        if os.environ.get("FCX_REQUIRE_SERVER"):
            raise
        pytest.skip(f"no server environment ({exc}); make serve-env")


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory, exported_dir, runner) -> Path:
    out = Path(shutil.copytree(exported_dir, tmp_path_factory.mktemp("served") / "artifacts"))
    result = invoke(runner, "export", "--triton", "--name", "digits", "--max-batch-size", "8", "--artifacts", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def server(served_dir):
    env = _server_env()
    with pipeline.serve(served_dir, http_port=free_port(), grpc_port=free_port(), server_env=env.root) as running:
        yield running
    assert not running.alive()


def test_verify_url_passes_over_http_and_grpc(server, served_dir, runner):
    assert server.models == ("digits",) and "digits_torchscript" in server.left
    result = invoke(runner, "verify", "--url", server.http_url, "--url", server.grpc_url, "--model", "digits",
                    "--json", "--artifacts", served_dir)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [("triton-http", "pass"), ("triton-grpc", "pass")]
    assert all(r["max_abs"] < 1e-5 and r["top1_agreement"] == 1.0 for r in rows)


def test_verify_url_fails_for_another_model(server, tmp_path, runner):
    """The served model against a model.pt it was not exported from: a failure, not a pass."""
    other = tmp_path / "other"
    assert invoke(runner, "train", "--data", "digits", "--hidden", "16", "--epochs", "1", "-q", "--seed", "7",
                  "--artifacts", other).exit_code == 0
    result = invoke(runner, "verify", "--url", server.http_url, "--model", "digits", "--json", "--artifacts", other)
    assert result.exit_code == 1
    row = json.loads(result.stdout)["rows"][0]
    assert row["status"] == "fail" and any("another model.pt" in p for p in row["problems"])


def test_predict_url_gives_the_local_labels(server, served_dir, runner, tmp_path):
    from fcexport.samples import write_samples

    write_samples("digits", tmp_path / "s", 6)
    local = invoke(runner, "predict", tmp_path / "s", "--json", "--artifacts", served_dir)
    served = invoke(runner, "predict", tmp_path / "s", "--url", server.grpc_url, "--model", "digits", "--json")
    assert local.exit_code == 0 and served.exit_code == 0, served.output
    pick = lambda out: [(r["file"], r["label"], round(r["probability"], 5)) for r in json.loads(out)]  # noqa: E731
    assert pick(served.stdout) == pick(local.stdout) and len(pick(local.stdout)) == 6


def test_the_server_refuses_a_wrong_shape_and_an_oversized_batch(server, runner, tmp_path):
    endpoint = remote.connect(server.http_url, "digits")
    with pytest.raises(FcxError, match=r"refused to run a batch of 2: .*unexpected shape for input 'pixels'"):
        remote.infer(endpoint, np.zeros((2, 1, 8, 9), np.float32))
    with pytest.raises(FcxError, match=r"refused to run a batch of 9: .*batch-size must be <= 8"):
        remote.infer(endpoint, np.zeros((9, 1, 8, 8), np.float32))
    result = invoke(runner, "predict", tmp_path, "--url", server.http_url, "--model", "nope")
    assert result.exit_code == 2 and "no such model is ready there" in result.output
    result = invoke(runner, "predict", tmp_path, "--url", f"http://127.0.0.1:{free_port()}", "--model", "digits")
    assert result.exit_code == 2 and "is fcx serve running there?" in result.output


def test_dynamic_batching_merges_concurrent_requests(server):
    endpoint_of = lambda: remote.connect(server.grpc_url, "digits")  # noqa: E731 - one client per thread
    before = remote.statistics(endpoint_of())
    stop = time.monotonic() + 2.0
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)

    def load():
        endpoint = endpoint_of()
        while time.monotonic() < stop:
            remote.infer(endpoint, x)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    after = remote.statistics(endpoint_of())
    merged = {size: count - before.get(size, 0) for size, count in after.items() if size > 1 and count > before.get(size, 0)}
    assert merged, after  # batches of more than one request ran: the dynamic batcher merged them


def test_the_readme_deploy_commands_serve_a_verified_model(exported_dir, tmp_path, runner, monkeypatch):
    """README "Deploy": its three commands, as written (ports moved to free ones), from model.pt to a verified server."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Deploy.*?```\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.startswith("fcx ")]
    assert [c[1] for c in commands] == ["export", "serve", "verify"]
    shutil.copy(exported_dir / "model.pt", tmp_path / "model.pt")
    (tmp_path / "artifacts").mkdir()
    shutil.copy(exported_dir / "model.pt", tmp_path / "artifacts" / "model.pt")
    monkeypatch.chdir(tmp_path)
    export, serve, verify = commands
    assert invoke(runner, *export[1:]).exit_code == 0
    http, grpc = free_port(), free_port()
    process = _start_cli(tmp_path / "artifacts", http, grpc, extra=serve[2:])
    try:
        ports = {"8000": str(http), "8001": str(grpc)}
        args = [re.sub(r":(8000|8001)$", lambda m: ":" + ports[m.group(1)], a) for a in verify[1:]]
        result = invoke(runner, *args)
        assert result.exit_code == 0, result.output
        assert "PASSED" in result.output and "triton-grpc" in result.output
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait() == 0


def _tritonserver_of(port: int) -> int | None:
    """The pid of the live (not zombie) tritonserver listening on `port`, from /proc."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"--http-port={port}".encode() in cmdline and state != "Z":
            return int(proc.name)
    return None


def _start_cli(folder: Path, http: int, grpc: int, extra: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "FCX_TRITON_ENV": str(_server_env().root), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", "from cli.main import main; main()", "serve", "--artifacts", str(folder),
               "--http-port", str(http), "--grpc-port", str(grpc), *extra]
    process = subprocess.Popen(command, cwd=folder.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=bounded())  # every wait on it ends, however busy the machine
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("ready:"):
            return process
    process.kill()
    raise AssertionError("fcx serve never said ready: " + "".join(lines) + process.stderr.read())


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_nothing_is_left_after_fcx_stops(served_dir, how):
    http, grpc = free_port(), free_port()
    process = _start_cli(served_dir, http, grpc)
    server_pid = _tritonserver_of(http)
    assert server_pid is not None
    shm = list(SHM.glob(f"{SHM_PREFIX}{process.pid}-*"))
    assert shm  # the python backend's regions carry fcx's pid
    assert not list(Path("/tmp").glob(f"{TEMP_PREFIX}{process.pid}-*"))  # removed once the models loaded
    process.send_signal(how)
    assert process.wait() == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    if how == signal.SIGTERM:
        assert "stopped" in process.stderr.read()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (_tritonserver_of(http) or any(p.exists() for p in shm)):
        time.sleep(0.1)
    assert _tritonserver_of(http) is None  # it got SIGTERM from the kernel when fcx died (PR_SET_PDEATHSIG)
    assert not any(p.exists() for p in shm)
    from fcexport.serve import check_port_free

    check_port_free(http)
    check_port_free(grpc)


def test_serve_refuses_a_planted_file_before_starting(served_dir, tmp_path):
    folder = Path(shutil.copytree(served_dir, tmp_path / "a"))
    (folder / "model_repository/digits/1/model.py").write_text("import os\nos.system('touch /tmp/pwned')\n")
    with pytest.raises(FcxError, match="model.py is not listed in manifest.json"):
        with pipeline.serve(folder, http_port=free_port(), grpc_port=free_port(), server_env=_server_env().root):
            pass


class _HostileServer:
    """A KServe v2 HTTP server on 127.0.0.1 that is ready, sends a real config, and answers infer as `mode` says."""

    def __init__(self, config: dict, mode: str):
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = json.dumps(config if self.path.endswith("/config") else {}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                if outer.mode == "huge":  # declares 1.5 GB: refused before a byte of it is read
                    self.send_response(200)
                    self.send_header("Content-Length", str(1_500_000_000))
                    self.end_headers()
                    return
                if outer.mode == "drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    try:
                        for _ in range(20):
                            time.sleep(0.2)
                            self.wfile.write(b" ")
                            self.wfile.flush()
                    except OSError:  # the client gave up: that is the point
                        pass
                    return
                header = json.dumps({"model_name": "digits", "outputs": [{"name": "logits", "datatype": "FP32",
                                     "shape": [1, 10, 1000000], "parameters": {"binary_data_size": 40}}]}).encode()
                self.send_response(200)
                self.send_header("Inference-Header-Content-Length", str(len(header)))
                self.send_header("Content-Length", str(len(header) + 40))
                self.end_headers()
                self.wfile.write(header + b"\0" * 40)

        self.mode = mode
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode, expected", [("lie", "is malformed"), ("drip", "no whole answer within 1 s"),
                                            ("huge", "declares 1500000000 bytes")])
def test_a_hostile_server_is_one_line_and_cut_off(served_dir, runner, tmp_path, monkeypatch, mode, expected):
    from google.protobuf import json_format

    from fcexport.samples import write_samples
    from fcexport.triton_config import parse_config

    config = json_format.MessageToDict(parse_config((served_dir / "model_repository/digits/config.pbtxt").read_bytes(), "c"),
                                       preserving_proto_field_name=True)
    monkeypatch.setattr(remote, "TIMEOUT_SECONDS", 1.0)
    write_samples("digits", tmp_path / "s", 1)
    server = _HostileServer(config, mode)
    try:
        result = invoke(runner, "predict", tmp_path / "s", "--url", server.url, "--model", "digits")
        assert result.exit_code == 2 and expected in result.output, result.output
    finally:
        server.close()


def test_newcomer_mistakes_against_a_server(server, served_dir, runner, tmp_path):
    http_port, grpc_port = server.http_url.rsplit(":", 1)[1], server.grpc_url.rsplit(":", 1)[1]
    result = invoke(runner, "verify", "--url", f"http://127.0.0.1:{grpc_port}", "--artifacts", served_dir)
    assert result.exit_code == 2 and "does not answer HTTP/1.1 (a gRPC port?)" in result.output, result.output
    result = invoke(runner, "verify", "--url", f"grpc://127.0.0.1:{http_port}", "--artifacts", served_dir)
    assert result.exit_code == 2 and "does not answer gRPC (an HTTP port?)" in result.output, result.output
    result = invoke(runner, "predict", tmp_path, "--url", server.http_url, "--model", "digit")
    assert result.exit_code == 2 and "it serves digits" in result.output, result.output
    result = invoke(runner, "verify", "--url", server.grpc_url, "--json", "--artifacts", served_dir)  # no --model: the one served
    assert result.exit_code == 0 and json.loads(result.stdout)["rows"][0]["source"].endswith("model digits")
    result = invoke(runner, "verify", "--model", "digits", "--artifacts", served_dir)
    assert result.exit_code == 2 and "goes with --url" in result.output
    result = invoke(runner, "predict", tmp_path, "--model", "digits", "--artifacts", served_dir)
    assert result.exit_code == 2 and "a served model's name goes with --url" in result.output
