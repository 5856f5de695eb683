"""How fcexport's steps scale with the number of nodes in a model's graph: N chained adds before a Linear.

    python benchmarks/graph_size.py 1000 4000 10000

Prints seconds per step (import, read + fuse, TorchScript export, ONNX export) for each N: compare the
per-node costs across N in one run (these machines are noisy)."""

import argparse
import tempfile
import time
from pathlib import Path

from torch import nn

import fcexport
from fcexport.checkpoint import read_model
from fcexport.pipeline import fused_model
from fcexport.targets.onnx import onnx_bytes
from fcexport.targets.torchscript import torchscript_bytes


class Chain(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n, self.fc = n, nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        for _ in range(self.n):
            x = x + 0.001
        return self.fc(x)


def measure(n: int, folder: Path) -> dict:
    started = time.perf_counter()
    fcexport.import_model(Chain(n), (1, 8, 8), artifacts=folder)
    imported = time.perf_counter()
    stored = read_model(folder / "model.pt")
    program, _, spec = fused_model(stored)
    fused = time.perf_counter()
    torchscript_bytes(program, spec)
    scripted = time.perf_counter()
    onnx_bytes(program, spec)
    done = time.perf_counter()
    return {"nodes": len(program.nodes), "import": imported - started, "read + fuse": fused - imported,
            "torchscript": scripted - fused, "onnx": done - scripted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nodes", nargs="*", type=int, default=[1000, 4000], help="chain lengths [1000 4000]")
    parser.add_argument("--quick", action="store_true", help="does it run: one chain of 50 nodes")
    args = parser.parse_args()
    if args.quick:
        args.nodes = [50]
    print("| nodes | import s | read + fuse s | TorchScript s | ONNX s | ONNX ms/node |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.nodes:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(n, Path(tmp))
        print(f"| {r['nodes']:,} | {r['import']:.1f} | {r['read + fuse']:.1f} | {r['torchscript']:.1f} | {r['onnx']:.1f} | "
              f"{1e3 * r['onnx'] / r['nodes']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
