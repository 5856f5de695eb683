"""Training throughput side by side in one run: fcexport's in-memory loop vs the naive tutorial loop.

    python benchmarks/bench_train.py [--data-root ../shared/data] [--epochs 3]
    python benchmarks/bench_train.py --quick --data-root DIR   # seconds: one epoch, one round (make test, on stand-in files)

Both train the default MLP-BN (784-784-256-10) on the same Fashion-MNIST files with 2 CPU threads.
The naive loop is the seed's tutorial: torchvision dataset + ToTensor + DataLoader(batch 64) + Adam.
fcexport's loop uses its defaults (tensors in memory, batch 256, flips and shifts, AdamW one-cycle).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn


def naive_samples_per_second(root: str, epochs: int) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from fcexport.models import build_model, model_config

    data = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(data, batch_size=64, shuffle=True)
    torch.manual_seed(0)
    model = build_model(model_config([1, 28, 28], 10, [784, 256], normalize={"mean": 0.286, "std": 0.353}))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(len(data) / (time.perf_counter() - start))
    return statistics.median(rates)


def fcexport_samples_per_second(root: str, epochs: int) -> float:
    from fcexport.data import load_dataset, train_val_split
    from fcexport.models import build_for
    from fcexport.training import TrainOptions, fit

    opts = TrainOptions(data_root=root, epochs=epochs, device="cpu", flip=True).with_arch_defaults()
    dataset = load_dataset("fashion-mnist", root)
    train, val = train_val_split(dataset.train, opts.val_split, opts.seed)
    model, _ = build_for(dataset, opts)
    result = fit(model, train, val, opts)
    return statistics.median(r["samples_per_second"] for r in result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description="training throughput benchmark")
    default_root = os.environ.get("FCX_DATA_ROOT") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--data-root", default=default_root, help=f"folder holding FashionMNIST/raw [default: {default_root}]")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="does it run: one epoch, one round")
    args = parser.parse_args()
    rounds = 1 if args.quick else 2
    if args.quick:
        args.epochs = 1
    if not (Path(args.data_root) / "FashionMNIST" / "raw").is_dir():
        sys.exit(f"error: no FashionMNIST/raw under {args.data_root}; pass --data-root (or set FCX_DATA_ROOT) "
                 "to the folder that holds it")
    # alternate the two loops and keep each one's median epoch, so machine noise hits both alike
    naive_runs, our_runs = [], []
    for _ in range(rounds):
        naive_runs.append(naive_samples_per_second(args.data_root, args.epochs))
        our_runs.append(fcexport_samples_per_second(args.data_root, args.epochs))
    naive, ours = statistics.median(naive_runs), statistics.median(our_runs)
    print(f"# training benchmark: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| loop | samples/s (median epoch) | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| naive torchvision DataLoader (batch 64, ToTensor, Adam) | {naive:,.0f} | 1.00x |")
    print(f"| fcexport fit() defaults (in-memory tensors, batch 256) | {ours:,.0f} | {ours / naive:.2f}x |")


if __name__ == "__main__":
    main()
