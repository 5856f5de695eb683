"""Bounds that hold (issue 30): Triton configs judged against what export wrote, size caps before every read,
deadlines on every remote call and on the command, and -q messages that point only at what was printed."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from helpers import invoke
from test_hostile import run_limited
from typer.testing import CliRunner


def test_quiet_verify_says_what_failed_instead_of_pointing_above(artifacts_copy, exported_dir, runner):
    model = artifacts_copy / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    for flag in ("-q", "--json"):
        r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "onnxruntime", "--devices", "cpu", flag)
        assert r.exit_code == 1 and "above" not in r.stderr, r.stderr
        assert "onnxruntime on cpu: model.onnx changed after it was written" in r.stderr, r.stderr
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--devices", "cuda", "-q")
    if r.exit_code == 0:
        pytest.skip("CUDA is here: nothing is skipped")
    assert r.exit_code == 1 and "above" not in r.stderr and "no CUDA device here" in r.stderr, r.stderr
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "onnxruntime", "--devices", "cpu")
    assert r.exit_code == 1 and "see the table above" in r.stderr and "FAILED" in r.stdout


# ---- remote calls: one deadline per request (connect, headers, body), one per command --------------------------


@pytest.fixture(scope="module")
def triton_dir(tmp_path_factory, exported_dir) -> Path:
    """An exported folder with a Triton repository (model digits, max batch 8)."""
    out = Path(shutil.copytree(exported_dir, tmp_path_factory.mktemp("triton") / "artifacts"))
    result = invoke(CliRunner(), "export", "--triton", "--name", "digits", "--max-batch-size", "8", "--artifacts", out)
    assert result.exit_code == 0, result.output
    return out


class FakeKServe:
    """A KServe v2 HTTP server on 127.0.0.1 serving `config` with zero logits. `drip` (seconds): the first answer's
    status line and headers go out one byte at a time that far apart (`dripped` is set when that ends, `cut_off` too
    when the client had hung up before); `delay` (seconds): every answer waits that long first. Used as a context
    manager: always stopped."""

    def __init__(self, config: dict, drip: float = 0.0, delay: float = 0.0):
        import http.server

        fake = self
        self.config, self.drip, self.delay, self.requests = config, drip, delay, 0
        self.dripped, self.cut_off = threading.Event(), threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer(json.dumps(fake.config if self.path.endswith("/config") else {}).encode(), {})

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = json.loads(body[: int(self.headers["Inference-Header-Content-Length"])])
                batch, output = request["inputs"][0]["shape"][0], fake.config["output"][0]["name"]
                labels = json.loads(fake.config["parameters"]["fcexport_spec"]["string_value"])["class_names"]
                top = request["outputs"][0]["parameters"].get("classification")
                if top:  # Triton's classification extension: "score:index:label" strings
                    data = [f"0.0:{i}:{labels[i]}" for _ in range(batch) for i in range(top)]
                    answer = {"outputs": [{"name": output, "datatype": "BYTES", "shape": [batch, top], "data": data}]}
                    return self.answer(json.dumps(answer).encode(), {})
                size = 4 * batch * len(labels)
                header = json.dumps({"outputs": [{"name": output, "datatype": "FP32", "shape": [batch, len(labels)],
                                                  "parameters": {"binary_data_size": size}}]}).encode()
                self.answer(header + bytes(size), {"Inference-Header-Content-Length": str(len(header))})

            def answer(self, body: bytes, headers: dict):
                fake.requests += 1
                time.sleep(fake.delay)
                head = "HTTP/1.0 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                head = (head + f"Content-Length: {len(body)}\r\n\r\n").encode()
                try:
                    if fake.requests == 1 and fake.drip:
                        try:
                            for i in range(len(head)):
                                self.wfile.write(head[i : i + 1])
                                self.wfile.flush()
                                time.sleep(fake.drip)
                            head = b""
                        except OSError:  # the client hung up before the headers were out: that is the point
                            fake.cut_off.set()
                            raise
                        finally:
                            fake.dripped.set()
                    self.wfile.write(head + body)
                except OSError:
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKServe:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def served_config(folder: Path) -> dict:
    from google.protobuf import json_format

    from fcexport.triton_config import parse_config

    config = parse_config((folder / "model_repository/digits/config.pbtxt").read_bytes(), "config.pbtxt")
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def remote_command(command: str, folder: Path, url: str, tmp_path: Path, *extra) -> list:
    if command == "predict":
        from fcexport.samples import write_samples

        write_samples("digits", tmp_path / "s", 20)  # three requests at the served max batch of 8
        return ["predict", tmp_path / "s", "--url", url, "--model", "digits", *extra]
    return ["verify", "--url", url, "--model", "digits", "--artifacts", folder, "-q", *extra]


@pytest.mark.parametrize("command", ["predict", "verify"])
def test_headers_sent_a_byte_at_a_time_meet_the_request_deadline(triton_dir, runner, tmp_path, monkeypatch, command):
    """Each byte comes well within a socket timeout, the headers take ~3 s: a 1 s request deadline cuts them off."""
    from fcexport import remote

    monkeypatch.setattr(remote, "TIMEOUT_SECONDS", 1.0)
    with FakeKServe(served_config(triton_dir), drip=0.05) as server:
        r = invoke(runner, *remote_command(command, triton_dir, server.url, tmp_path))
        server.dripped.wait()  # the drip is finite: this wait ends
        assert server.cut_off.is_set(), "the client waited for the whole header"
    assert r.exit_code == 2 and "no whole answer within 1 s to ask whether the model is ready" in r.stderr, r.output
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["predict", "verify"])
def test_a_server_slow_on_every_request_meets_the_command_deadline(triton_dir, runner, tmp_path, command):
    """Every request is answered in 0.3 s, well within its own deadline; the command as a whole gets 1 s."""
    with FakeKServe(served_config(triton_dir), delay=0.3) as server:
        r = invoke(runner, *remote_command(command, triton_dir, server.url, tmp_path, "--timeout", "1"))
        assert 2 <= server.requests <= 5, server.requests
    assert r.exit_code == 2 and "the command's overall deadline of 1 s ran out" in r.stderr, r.output
    assert "--timeout" in r.stderr and r.stderr.count("\n") == 1


def test_timeout_goes_with_url_and_is_positive(exported_dir, runner, tmp_path):
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--timeout", "5")
    assert r.exit_code == 2 and "goes with --url" in r.stderr
    r = invoke(runner, "predict", tmp_path, "--url", "http://127.0.0.1:9", "--timeout", "0")
    assert r.exit_code == 2 and "--timeout takes a positive number of seconds" in r.stderr
    assert "[default: 300]" in " ".join(invoke(runner, "predict", "--help").stdout.split())


# ---- every file is size-capped before it is read -----------------------------------------------------------------


def sparse(path: Path, size: int, tail: bytes = b"") -> Path:
    """`path` made `size` bytes long without writing them (a hole), `tail` at its end."""
    with open(path, "wb") as f:
        f.truncate(size - len(tail))
        f.seek(size - len(tail))
        f.write(tail)
    return path


def test_a_3_gb_manifest_is_refused_before_it_is_read(artifacts_copy):
    sparse(artifacts_copy / "manifest.json", 3 << 30)
    r = run_limited("verify", "--artifacts", artifacts_copy, "--backends", "onnxruntime", "--devices", "cpu")
    assert r.returncode == 2 and "manifest.json: 3,221,225,472 bytes is larger than fcexport reads" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_a_3_9_gb_model_pt_is_refused_from_its_zip_directory(exported_dir, tmp_path):
    """A real model.pt at the end of 3.9 GB that no record declares: refused from the directory, never read whole."""
    model = sparse(tmp_path / "model.pt", 3_900_000_000, (exported_dir / "model.pt").read_bytes())
    r = run_limited("inspect", model)
    assert r.returncode == 2 and "belong to no record its zip directory lists" in r.stderr, r.stderr
    r = run_limited("fuse-bn", "--artifacts", tmp_path)
    assert r.returncode == 2 and "belong to no record its zip directory lists" in r.stderr, r.stderr


def test_a_zip_directory_larger_than_its_records_allow_is_not_read(exported_dir, tmp_path):
    """An end record that declares a 2 GB central directory: refused from the end record alone."""
    import struct

    data = bytearray((exported_dir / "model.pt").read_bytes())
    end, end64 = data.rfind(b"PK\x05\x06"), data.rfind(b"PK\x06\x06")  # torch writes both end records
    data[end + 12 : end + 16] = struct.pack("<I", 2_000_000_000)
    if end64 >= 0:
        data[end64 + 40 : end64 + 48] = struct.pack("<Q", 2_000_000_000)
    (tmp_path / "model.pt").write_bytes(bytes(data))
    r = invoke(CliRunner(), "inspect", tmp_path / "model.pt")
    assert r.exit_code == 2 and "-byte directory is more than a model file holds" in r.stderr, r.stderr


def test_oversized_keys_and_signatures_are_refused_before_they_are_read(exported_dir, artifacts_copy, runner, tmp_path):
    key = sparse(tmp_path / "key.pem", 1 << 20, b"\n-----END PRIVATE KEY-----\n")
    r = invoke(runner, "export", "--artifacts", artifacts_copy, "--format", "onnx", "--sign-key", key)
    assert r.exit_code == 2 and "1,048,576 bytes is larger than fcexport reads" in r.stderr, r.stderr
    from test_signing import write_key_pair

    _, public = write_key_pair(tmp_path)
    sparse(artifacts_copy / "model.sig", 17 << 20)
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--public-key", public, "-q")
    assert r.exit_code == 1 and "larger than a signature fcexport reads" in r.stderr, r.stderr


# ---- Triton configs against what export wrote from the settings it recorded ------------------------------------


@pytest.fixture
def triton_copy(tmp_path, triton_dir) -> Path:
    return Path(shutil.copytree(triton_dir, tmp_path / "artifacts"))


def edit_config(folder: Path) -> None:
    """The attack of issue 30: max_batch_size 8 -> 1 and a junk line, the manifest refreshed to match."""
    from test_triton import _refresh

    config = folder / "model_repository/digits/config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 1") + "# junk\n")
    _refresh(folder, "model_repository/digits/config.pbtxt")


def triton_row(runner, folder: Path, *extra) -> tuple[int, dict]:
    r = invoke(runner, "verify", "--artifacts", folder, "--backends", "onnxruntime", "--devices", "cpu", "--json", *extra)
    return r.exit_code, {c["check"]: c for c in json.loads(r.stdout)["trust"]}


def test_export_records_the_triton_settings_and_an_honest_folder_checks(triton_dir, runner):
    manifest = json.loads((triton_dir / "manifest.json").read_text())
    assert manifest["settings"] == {"triton": {"name": "digits", "max_batch_size": 8, "instances": 1, "gpu": False}}
    code, rows = triton_row(runner, triton_dir)
    assert code == 0 and rows["triton"]["status"] == "pass", rows


def test_an_edited_config_with_a_refreshed_manifest_fails_verify(triton_copy, runner):
    edit_config(triton_copy)
    code, rows = triton_row(runner, triton_copy)
    assert code == 1 and rows["triton"]["status"] == "fail", rows
    assert "digits/config.pbtxt is not what fcx export writes with the settings it recorded (max batch 8" in rows["triton"]["detail"]
    assert "max_batch_size differ" in rows["triton"]["detail"]


def test_a_junk_line_alone_fails_byte_for_byte(triton_copy, runner):
    from test_triton import _refresh

    config = triton_copy / "model_repository/digits/config.pbtxt"
    config.write_text(config.read_text() + "# junk\n")
    _refresh(triton_copy, "model_repository/digits/config.pbtxt")
    code, rows = triton_row(runner, triton_copy)
    assert code == 1 and "its text differs (comments, order or layout)" in rows["triton"]["detail"], rows


def test_a_folder_re_signed_with_another_key_fails_without_a_public_key(triton_copy, runner, tmp_path):
    """Signed with key A, edited, re-signed with key B: without --public-key the signature row says it was not
    checked, and the configs are still judged against what export wrote."""
    from test_signing import write_key_pair

    key_a, _ = write_key_pair(tmp_path, "a")
    key_b, public_b = write_key_pair(tmp_path, "b")
    assert invoke(runner, "sign", "--key", key_a, "--artifacts", triton_copy).exit_code == 0
    edit_config(triton_copy)
    assert invoke(runner, "sign", "--key", key_b, "--artifacts", triton_copy).exit_code == 0
    code, rows = triton_row(runner, triton_copy)
    assert code == 1 and rows["triton"]["status"] == "fail", rows
    assert rows["signature"]["status"] == "skipped" and "not checked" in rows["signature"]["detail"], rows
    code, rows = triton_row(runner, triton_copy, "--public-key", public_b)  # B's own signature holds; the config does not
    assert code == 1 and rows["signature"]["status"] == "pass" and rows["triton"]["status"] == "fail", rows


def test_a_manifest_without_recorded_settings_fails_the_repository(triton_copy, runner):
    manifest = json.loads((triton_copy / "manifest.json").read_text())
    del manifest["settings"]
    (triton_copy / "manifest.json").write_text(json.dumps(manifest))
    code, rows = triton_row(runner, triton_copy)
    assert code == 1 and "records no Triton settings" in rows["triton"]["detail"], rows


def test_settings_go_with_the_repository(triton_copy, runner):
    assert invoke(runner, "export", "--artifacts", triton_copy, "--format", "onnx", "--no-check").exit_code == 0
    manifest = json.loads((triton_copy / "manifest.json").read_text())
    assert not (triton_copy / "model_repository").exists() and "settings" not in manifest
