"""Two draws of float32 rounding (issue 29): how far apart model.pt's own float32 errors are on verify's inputs and on
the same inputs moved one float32 step, and how onnxruntime's error compares with the first draw and with the larger.

    python benchmarks/own_draws.py timm:visformer_tiny --seeds 0 1 2 3 4 5 6 7     # an ill-conditioned model
    python benchmarks/own_draws.py resnet18 mobilenet_v3_small timm:tiny_vit_5m_224 # well-conditioned ones
    python benchmarks/own_draws.py --quick                                          # seconds: does it run

Each model is built as benchmarks/zoo.py builds it (random weights drawn after torch.manual_seed(SEED), BatchNorm
statistics set), imported, exported to ONNX unfolded, and run on verify's kinds of inputs (parity.make_inputs: random
pixels, then first-layer probes). One draw of an ill-conditioned model's rounding can be far below another: verify's
yardstick is the larger of the two (fcexport.targets.program.every_answer).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def measure(name: str, seed: int, budget: int, size: int, folder: Path) -> dict:
    """One model and seed: its largest |logit|, the first draw, and the ratios the table shows."""
    import onnxruntime as ort
    import torch
    from zoo import build

    import fcexport
    from fcexport import parity
    from fcexport.checkpoint import read_model
    from fcexport.targets.program import float64_logits, nudged, program_predictor

    torch.manual_seed(seed)
    model = build(name)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg["input_size"][-1] if cfg.get("fixed_input_size") else size
    fcexport.import_model(model, (3, size, size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), artifacts=folder)
    fcexport.export(folder / "model.pt", folder, formats=("onnx",), fuse=False, check=False)
    stored = read_model(folder / "model.pt")
    probes = parity.probe_inputs(stored.program, stored.spec, parity.probe_count(budget, stored.spec))
    x = parity.make_inputs(stored.spec, budget, probes=probes, unavailable="no data").x
    exact = float64_logits(stored.program, x, stored.spec.peak_bytes)
    predictor = program_predictor(stored.program, "eager", "cpu", folder / "model.pt", stored.spec)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    first, second, onnx = (float(np.abs(y.astype(np.float64) - exact).max()) for y in (
        predictor(x), predictor(nudged(x)), session.run(None, {session.get_inputs()[0].name: x})[0]))
    return {"model": name, "seed": seed, "logit": float(np.abs(exact).max()), "first": first,
            "second": second / first if first else 1.0, "ort_first": onnx / first if first else 0.0,
            "ort_larger": onnx / max(first, second) if max(first, second) else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["timm:visformer_tiny"], help="as benchmarks/zoo.py names them")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="torch seeds of the random weights [0]")
    parser.add_argument("--inputs", type=int, default=64, help="verify's --inputs budget per model [64]")
    parser.add_argument("--size", type=int, default=224, help="image size where the model has none of its own [224]")
    parser.add_argument("--quick", action="store_true", help="does it run: squeezenet1_1 at 64 px on 16 inputs")
    args = parser.parse_args()
    if args.quick:
        args.models, args.seeds, args.inputs, args.size = ["squeezenet1_1"], [0], 16, 64
    print("| model | torch seed | largest \\|logit\\| | first draw (own error) | second / first | onnxruntime / first "
          "| onnxruntime / larger |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for name in args.models:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as folder:
                r = measure(name, seed, args.inputs, args.size, Path(folder))
            print(f"| {r['model']} | {r['seed']} | {r['logit']:.4g} | {r['first']:.3g} | {r['second']:.2f} | "
                  f"{r['ort_first']:.3g} | {r['ort_larger']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
