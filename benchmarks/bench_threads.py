"""How long torch's idle threads spin (GNU OpenMP's GOMP_SPINCOUNT), quiet and beside other work: why fcx sets 10,000.

    python benchmarks/bench_threads.py                     # every workload, quiet, 4 rounds
    python benchmarks/bench_threads.py --busy 2 --rounds 3 # beside two busy loops
    python benchmarks/bench_threads.py --quick             # seconds: one small workload, one round (make test runs it)

Each workload runs in a fresh process per setting (OpenMP reads these variables once, when torch loads it), the
settings alternating every round; each process times 5 repeats and reports their median, the table the median over
rounds. Read the ratios: the seconds depend on what else runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"default": {}, "spin 10,000": {"GOMP_SPINCOUNT": "10000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
WORKLOADS = ("resnet18-f32", "efficientnet_b0-f64", "mobilenet_v3_small-f32", "mlp-batch256", "mlp-batch1")


def workload(name: str):
    """(model, input, calls per repeat)."""
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    if name == "resnet18-f32":
        return torchvision.models.resnet18().eval(), torch.rand(8, 3, 224, 224), 5
    if name == "efficientnet_b0-f64":  # the float64 reference's shape: many small depthwise calls
        return torchvision.models.efficientnet_b0().eval().double(), torch.rand(8, 3, 224, 224, dtype=torch.float64), 2
    if name == "mobilenet_v3_small-f32":
        return torchvision.models.mobilenet_v3_small().eval(), torch.rand(8, 3, 224, 224), 20
    if name == "tiny":  # --quick
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), torch.rand(4, 64), 20
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.ReLU(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    return mlp.eval(), torch.rand(256 if name == "mlp-batch256" else 1, 1, 28, 28), 200 if name == "mlp-batch256" else 2000


def time_one(name: str) -> float:
    """ms per call of one workload in this process: the median of 5 repeats."""
    import torch

    model, x, calls = workload(name)
    with torch.inference_mode():
        for _ in range(max(2, calls // 10)):
            model(x)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                model(x)
            times.append((time.perf_counter() - started) / calls * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds, settings alternating [4]")
    parser.add_argument("--busy", type=int, default=0, help="busy Python loops to run beside the workloads [0]")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--quick", action="store_true", help="a tiny workload, one round: does it run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: time this workload, print ms
    args = parser.parse_args()
    if args.one:
        print(f"{time_one(args.one):.4f}")
        return
    names = ["tiny"] if args.quick else args.workloads.split(",")
    rounds = 1 if args.quick else args.rounds
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        found = {(n, s): [] for n in names for s in SETTINGS}
        for r in range(rounds):
            for name in names:
                for setting in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
                    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
                    done = subprocess.run([sys.executable, __file__, "--one", name], env=env | SETTINGS[setting],
                                          capture_output=True, text=True, check=True)
                    found[(name, setting)].append(float(done.stdout.split()[-1]))
    finally:
        for process in busy:
            process.kill()
    print(f"{rounds} rounds, {args.busy} busy loops beside; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| workload | " + " | ".join(SETTINGS) + " |")
    print("| --- |" + " ---: |" * len(SETTINGS))
    for name in names:
        base = statistics.median(found[(name, "default")])
        cells = [f"{statistics.median(found[(name, s)]):.3g} ms ({statistics.median(found[(name, s)]) / base:.2f}x)" for s in SETTINGS]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
