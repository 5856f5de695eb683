"""fcx verify against Polygraphy's comparison of the same model.onnx, side by side in one run (issue 29).

    python benchmarks/bench_verify.py                 # resnet50 at 224 px
    python benchmarks/bench_verify.py --model resnet18 --repeat 3
    python benchmarks/bench_verify.py --quick         # seconds: a small model, one round (make test runs it)

The model is a torchvision classifier with random weights and non-trivial BatchNorm statistics, imported, folded and
exported with fcx's defaults (untimed). Then, each round, in one process:
- `polygraphy (reference)`: Polygraphy's ONNX-Runtime runner on reference.npz's inputs (the 256 seeded random ones),
  compared with saved reference outputs by its default comparison (what `polygraphy run model.onnx --onnxrt
  --load-inputs ... --load-outputs ...` does), session creation included;
- `fcx --reference onnxruntime`: the same file, the same inputs, against the same saved answers (reference.npz),
  with the manifest check before;
- `fcx verify onnxruntime`: model.pt's float64 reference, the structure check, one row; as after the README's steps on
  this machine (fuse-bn --verify computed model.pt's float64 answers on these inputs, export wrote the files: both are
  recalled from fcexport.machine_cache);
- `..., nothing recorded`: the same with FCX_FRESH=1 (a folder from another machine: everything computed here);
- `polygraphy (verify's count)`: the same runner on as many inputs as fcx verify's default budget;
- `fcx verify (default backends)`: every default row.
Each fcx line also lists where its time went (verify's own progress steps). Ratios are to the Polygraphy line on the
same inputs; read them, not the seconds (the machine may be busy: the load average is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def prepare(name: str, folder: Path, size: int, budget: int | None) -> None:
    """import -> fuse-bn --verify -> export with the defaults, as the README does: the folder a user verifies."""
    import fcexport
    import zoo

    model = zoo.build(name)
    fcexport.import_model(model, (3, size, size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), artifacts=folder)
    fcexport.fuse(folder / "model.pt", folder / "model.fused.pt", verify=True, inputs=budget)
    fcexport.export(folder / "model.pt", folder)


def polygraphy_compare(onnx_file: Path, x: np.ndarray, reference: np.ndarray, batch: int) -> bool:
    """Polygraphy's own path: a session from the file, its runner over the inputs, its comparator against saved outputs."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # its per-iteration report would bury the table

    feeds = [{"pixels": x[i : i + batch]} for i in range(0, len(x), batch)]
    saved = RunResults()
    saved.append(("reference", [IterationResult({"logits": reference[i : i + batch]}, runner_name="reference")
                                for i in range(0, len(x), batch)]))
    runs = Comparator.run([OnnxrtRunner(SessionFromOnnx(str(onnx_file)))], data_loader=feeds)
    for name, iterations in saved.items():
        runs.append((name, iterations))
    return bool(Comparator.compare_accuracy(runs))


def timed(fn) -> tuple[float, object, list[tuple[str, float]]]:
    """Seconds for fn(on_step), its result, and the seconds between its progress steps."""
    marks: list[tuple[str, float]] = []
    started = time.perf_counter()
    result = fn(lambda label, *_: marks.append((label, time.perf_counter())))
    ended = time.perf_counter()
    steps, previous = {}, ("setting up", started)
    for label, at in [*marks, ("end", ended)]:
        kind = previous[0].split(" (")[0].split(" on ")[0]  # "checking and opening onnxruntime", "running int8", ...
        steps[kind] = steps.get(kind, 0.0) + at - previous[1]
        previous = (label, at)
    return ended - started, result, sorted(steps.items(), key=lambda item: -item[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a torchvision classifier [resnet50]")
    parser.add_argument("--size", type=int, default=224, help="input height and width [224]")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each line reports its fastest [1]")
    parser.add_argument("--quick", action="store_true", help="squeezenet1_1 at 64 px, 16 inputs, one round: does it run")
    args = parser.parse_args()
    if args.quick:
        args.model, args.size, args.repeat = "squeezenet1_1", 64, 1

    import fcexport
    from fcexport.pipeline import verify_with_reference
    from fcexport.targets.reference import FILE

    budget = 16 if args.quick else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(args.model, folder, args.size, budget)
        with np.load(folder / FILE, allow_pickle=False) as stored:
            from fcexport.spec import random_pixels

            x_ref, logits_ref = random_pixels(tuple(stored["input_shape"]), int(stored["count"])), stored["logits"]
        counted: dict[str, int] = {}  # verify's input count, read off its first report

        def polygraphy_verify_count(step):
            x = np.random.default_rng(1).random((counted["inputs"], 3, args.size, args.size), dtype=np.float32)
            return polygraphy_compare(folder / "model.onnx", x, np.zeros((len(x), logits_ref.shape[1]), np.float32), 256)

        def verify(backends, fresh=False):
            def run(step):
                os.environ["FCX_FRESH"] = "1" if fresh else "0"
                try:
                    report = fcexport.verify(folder, backends, ("cpu",), on_step=step, inputs=budget)
                finally:
                    os.environ.pop("FCX_FRESH")
                counted.setdefault("inputs", report.parity.input_count)
                return report
            return run

        lines = {
            "polygraphy (reference)": lambda step: polygraphy_compare(folder / "model.onnx", x_ref, logits_ref.astype(np.float32), 256),
            "fcx --reference onnxruntime": lambda step: verify_with_reference(folder, ("onnxruntime",), ("cpu",), on_step=step),
            "fcx verify onnxruntime": verify(("onnxruntime",)),
            "fcx verify onnxruntime, nothing recorded": verify(("onnxruntime",), fresh=True),
            "polygraphy (verify's count)": polygraphy_verify_count,
            "fcx verify (default backends)": verify(None),
        }
        peer = importlib.util.find_spec("polygraphy") is not None
        if not peer:  # the fcx lines still run; the ratios need the peer
            lines = {name: fn for name, fn in lines.items() if not name.startswith("polygraphy")}
        best: dict[str, tuple[float, list]] = {}
        for _ in range(args.repeat):
            for name, fn in lines.items():
                seconds, result, steps = timed(fn)
                if name.startswith("fcx") and not result.passed:
                    raise SystemExit(f"{name} did not pass: {result.to_json()}")
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, steps)
    print(f"{args.model} at {args.size} px; {len(x_ref)} reference inputs, {counted['inputs']} for verify's default; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; fastest of {args.repeat}")
    if not peer:
        print("polygraphy is not installed (pip install polygraphy): its lines and the ratios are left out")
    print("| line | seconds | x Polygraphy on the same inputs | where the time went (s) |")
    print("| --- | --- | --- | --- |")
    for name, (seconds, steps) in best.items():
        baseline = best.get("polygraphy (reference)" if "reference" in name else "polygraphy (verify's count)")
        ratio = f"{seconds / baseline[0]:.2f}" if baseline else "-"
        where = ", ".join(f"{kind} {s:.1f}" for kind, s in steps[:5]) if name.startswith("fcx") else ""
        print(f"| {name} | {seconds:.1f} | {ratio} | {where} |")


if __name__ == "__main__":
    main()
