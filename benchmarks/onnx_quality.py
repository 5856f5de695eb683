"""fcx's model.onnx against a plain `torch.onnx.export(dynamo=True)` of the same model, run side by side (issue 31 item 2).

    python benchmarks/onnx_quality.py                              # every zoo model (benchmarks/zoo.py), 224 px
    python benchmarks/onnx_quality.py mobilenet_v3_small timm:efficientnet_b0 --seconds 2
    python benchmarks/onnx_quality.py --quick                      # seconds: one small model (make test runs it)

Each model is built as the zoo builds it (random weights, BatchNorm statistics set), imported and exported by fcexport
(`import_model` -> `export(["onnx"])`: BatchNorm folded, the stored program's ops), and exported plainly from the
same module in eval mode, with the same normalisation in front (dynamic batch, the exporter's default opset). Both files run in onnxruntime with its
default session settings on the same inputs, alternating, each timed for --seconds per round and batch size; the
ratio is fcx's throughput over the plain file's (above 1: fcx's file is faster). Node counts beside. The machine's
load is printed: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def plain_onnx(model, shape: tuple, path: Path) -> None:
    """What a user wiring it by hand writes: torch.onnx.export(dynamo=True) with a dynamic batch, of the same function
    fcx's file computes: the model on (pixels - mean) / std (fcx keeps the normalisation in the file where it cannot
    fold it exactly into the first layer; a hand-wired pipeline pays for it too, in or before the graph)."""
    import torch

    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(MEAN).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, -1, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean) / self.std)

    example = torch.rand(2, *shape)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines would break the table
        torch.onnx.export(Normalised().eval(), (example,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))


def throughput(session, x: np.ndarray, seconds: float) -> float:
    """Images per second over `seconds` (after one warm-up call, at least 3 calls)."""
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    started, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - started < seconds:
        session.run(None, {name: x})
        calls += 1
    return calls * len(x) / (time.perf_counter() - started)


def compare(name: str, size: int, seconds: float, rounds: int, folder: Path, opset: int | None = None) -> dict:
    """Both files of one model: node counts and, per batch size, fcx's throughput over the plain file's."""
    import onnx
    import onnxruntime as ort
    import zoo

    import fcexport

    model = zoo.build(name)
    shape = (3, size, size)
    fcexport.import_model(model, shape, mean=MEAN, std=STD, artifacts=folder)
    fcexport.export(folder / "model.pt", folder, ["onnx"], opset=opset, check=False)
    plain_onnx(model, shape, folder / "plain.onnx")
    files = {"fcx": folder / "model.onnx", "plain": folder / "plain.onnx"}
    nodes = {k: len(onnx.load(str(p), load_external_data=False).graph.node) for k, p in files.items()}
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in files.items()}
    ratios = {}
    for batch in (1, 64):
        x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
        found = {k: [] for k in sessions}
        for round_ in range(rounds):  # alternate, and swap who goes first (ABBA), so load and warm-up hit both alike
            for k, session in (list(sessions.items()) if round_ % 2 == 0 else list(sessions.items())[::-1]):
                found[k].append(throughput(session, x, seconds))
        ratios[batch] = float(np.median(found["fcx"]) / np.median(found["plain"]))
    return {"model": name, "nodes": nodes, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="torchvision names, timm:NAME or hf:CLASS [default: the zoo's list]")
    parser.add_argument("--size", type=int, default=224, help="image height and width [224]")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per file, round and batch size [1]")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each ratio is of the medians [3]")
    parser.add_argument("--opset", type=int, default=None, help="fcx's ONNX opset [fcx export's default]")
    parser.add_argument("--quick", action="store_true", help="does it run: mobilenet_v3_small at 64 px, short timings")
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.seconds, args.rounds = ["mobilenet_v3_small"], 64, 0.05, 1
    import zoo

    names = args.models or zoo.all_models()
    print(f"# fcx model.onnx / plain dynamo export, onnxruntime defaults, {args.size} px; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores{' (--quick: not measurements)' if args.quick else ''}\n")
    print("| model | nodes fcx / plain | batch 1 | batch 64 |")
    print("| --- | ---: | ---: | ---: |", flush=True)
    results, failed = [], []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                result = compare(name, args.size, args.seconds, args.rounds, Path(tmp), args.opset)
            except Exception as exc:  # one model that cannot be exported one way or the other is a line
                print(f"| {name} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} | | |",
                      flush=True)
                failed.append(name)
                continue
        results.append(result)
        r = result["ratios"]
        print(f"| {name} | {result['nodes']['fcx']} / {result['nodes']['plain']} | {r[1]:.2f}x | {r[64]:.2f}x |", flush=True)
    if results:
        worst = min(results, key=lambda r: min(r["ratios"].values()))
        under = [r["model"] for r in results if min(r["ratios"].values()) < 0.95]
        print(f"\nlowest ratio: {min(worst['ratios'].values()):.2f}x ({worst['model']}); under 0.95: "
              f"{', '.join(under) if under else 'none'}")
    if failed:
        sys.exit(f"{len(failed)} of {len(names)} could not be compared: {', '.join(failed)}")


if __name__ == "__main__":
    main()
