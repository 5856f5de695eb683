"""Serving side by side in one run: the real tritonserver (fcx serve's python-backend stand-in running model.onnx in
onnxruntime) over gRPC and HTTP, with Triton's dynamic batcher on and off, against onnxruntime in this process.

    python benchmarks/bench_serve.py [--model mlp|cnn] [--seconds 10]   (needs `make serve-env`)
    python benchmarks/bench_serve.py --quick     # seconds: a 1-epoch model in a temporary folder, 0.3 s rows (make test)

For 1, 8 and 32 concurrent clients (threads, one client each, batch-1 requests) it prints p50/p99 latency, requests
per second and the mean batch the server ran. Clients and server share this machine's cores, so the numbers are for
ratios within one run, not for capacity planning.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_inference import ensure_artifacts

from fcexport import remote
from fcexport.serve import ServedModel, find_server_env, free_port, running_server
from fcexport.targets.triton import check_repository
from fcexport.triton_config import LABELS_FILE, REPOSITORY


def served_models(folder: Path) -> list[ServedModel]:
    """The folder's repository model twice: as exported (dynamic batching on) and with the batcher taken out."""
    served, problems = check_repository(folder / REPOSITORY, lambda p: Path(p).read_bytes(), folder)
    assert not problems, problems
    onnx = next(m for m in served if m.platform == "onnxruntime_onnx")
    data, labels = onnx.model_file.read_bytes(), (onnx.model_file.parent.parent / LABELS_FILE).read_bytes()
    plain = type(onnx.config)()
    plain.CopyFrom(onnx.config)
    plain.name = "nobatch"
    plain.ClearField("dynamic_batching")
    return [ServedModel("batched", _renamed(onnx.config, "batched"), labels, data), ServedModel("nobatch", plain, labels, data)]


def _renamed(config, name: str):
    copy = type(config)()
    copy.CopyFrom(config)
    copy.name = name
    return copy


def load(url: str, model: str, clients: int, seconds: float, x: np.ndarray) -> dict:
    """`clients` threads sending batch-1 requests for `seconds`: latency percentiles, requests/s, server batches."""
    watcher = remote.connect(url, model)
    before = remote.statistics(watcher)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    window = {}

    def client(i: int) -> None:
        endpoint = remote.connect(url, model)  # one client per thread, as a real client fleet would have
        ready.wait()
        while time.perf_counter() < window["stop"]:
            t = time.perf_counter()
            remote.infer(endpoint, x)
            latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    window["stop"] = start + seconds
    ready.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    after = remote.statistics(watcher)
    runs = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    executions = sum(runs.values())
    done = np.concatenate([np.asarray(l) for l in latencies]) * 1e3
    return {"p50": float(np.percentile(done, 50)), "p99": float(np.percentile(done, 99)), "rps": len(done) / elapsed,
            "mean_batch": sum(s * n for s, n in runs.items()) / max(executions, 1)}


def in_process(onnx_path: Path, seconds: float, batch: int) -> dict:
    """onnxruntime here with fcx's settings: batch-`batch` latency and images/s, one caller."""
    import onnxruntime as ort

    from fcexport.targets.onnxruntime import session_options

    session = ort.InferenceSession(str(onnx_path), session_options(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = [d if isinstance(d, int) else batch for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(20):
        session.run(None, {name: x})
    times, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t)
    times = np.asarray(times) * 1e3
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)), "rps": batch * len(times) / times.sum() * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description="serving benchmark")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--artifacts", type=Path, default=None, help="[default: artifacts/bench-MODEL]")
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per row")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--quick", action="store_true", help="does it run: a 1-epoch model in a temporary folder, 0.3 s rows")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.clients = 0.3, "1,2"
        with tempfile.TemporaryDirectory() as tmp:
            return run(args, Path(tmp) / "bench", quick=True)
    run(args, args.artifacts or Path(f"artifacts/bench-{args.model}"))


def run(args, folder: Path, quick: bool = False) -> None:
    """Make the folder's model and repository if missing, then the in-process line and the served table."""
    ensure_artifacts(folder, args.model, quick)
    if not (folder / REPOSITORY).is_dir():
        import subprocess
        import sys

        subprocess.run([sys.executable, "-m", "cli.main", "export", "--triton", "--artifacts", str(folder), "--json"],
                       check=True, stdout=subprocess.DEVNULL)
    clients = [int(c) for c in args.clients.split(",")]
    env = find_server_env()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.model} ({folder}); "
          f"{args.seconds:.0f} s per row; server env {env.versions}")
    here = in_process(folder / "model.onnx", min(args.seconds, 3.0), 1)
    print(f"\nin-process onnxruntime, batch 1: p50 {here['p50'] * 1e3:.0f} us, p99 {here['p99'] * 1e3:.0f} us, "
          f"{here['rps']:,.0f} images/s (one caller)")
    models = served_models(folder)
    with running_server(env, models, free_port(), free_port()) as running:
        print(f"tritonserver {running.version}\n")
        print("| protocol | dynamic batching | clients | p50 ms | p99 ms | requests/s | mean batch run |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        endpoint = remote.connect(running.grpc_url, "batched")
        spec_shape = tuple(endpoint.config.input[0].dims)
        x = np.random.default_rng(1).random((1, *spec_shape), dtype=np.float32)
        rows = []
        for url, protocol in ((running.grpc_url, "gRPC"), (running.http_url, "HTTP")):
            for model, batching in (("batched", "on"), ("nobatch", "off")):
                for n in clients if protocol == "gRPC" else clients[:1]:
                    found = load(url, model, n, args.seconds, x)
                    rows.append((protocol, batching, n, found))
                    print(f"| {protocol} | {batching} | {n} | {found['p50']:.2f} | {found['p99']:.2f} | "
                          f"{found['rps']:,.0f} | {found['mean_batch']:.2f} |", flush=True)
    batched_32 = next((f for p, b, n, f in rows if (p, b, n) == ("gRPC", "on", max(clients))), None)
    plain_32 = next((f for p, b, n, f in rows if (p, b, n) == ("gRPC", "off", max(clients))), None)
    one = next(f for p, b, n, f in rows if (p, b, n) == ("gRPC", "on", 1))
    print(f"\nbatch-1 round trip over gRPC / in-process onnxruntime: {one['p50'] / here['p50']:.1f}x the latency")
    if batched_32 and plain_32:
        print(f"{max(clients)} clients, dynamic batching on / off: {batched_32['rps'] / plain_32['rps']:.2f}x the requests/s")
    print(f"served requests/s at best / in-process batch-1 images/s: {max(f['rps'] for *_, f in rows) / here['rps']:.2f}x")


if __name__ == "__main__":
    main()
