"""Test helpers: write real file formats (IDX, PNG) and call the CLI in-process."""

from __future__ import annotations

import contextlib
import resource
import signal
import struct
import sys
from pathlib import Path

import copy

import numpy as np
import torch
from typer.testing import CliRunner

from cli.main import app

TINY = ["--hidden", "32", "--epochs", "3", "--batch-size", "64", "-q"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format as in the MNIST family: magic (0x08 = uint8, rank), big-endian dims, raw bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic_images(n: int, classes: int = 10, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class k lights up a bar at a class-specific position, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 40, size=(n, size, size)).astype(np.float64)
    band = max(1, size // classes)
    for i, k in enumerate(labels):
        images[i, :, k * band : (k + 1) * band] += 200
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def save_png(path: Path, array: np.ndarray) -> Path:
    """uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA, uint16 (H, W) -> 16-bit gray."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def settle_batchnorms(model: torch.nn.Module, *inputs, steps: int = 20) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running stats and affine params, then switch to eval."""
    torch.manual_seed(0)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
            torch.nn.init.uniform_(m.weight, 0.5, 2.0)
            torch.nn.init.uniform_(m.bias, -1.0, 1.0)
    with torch.no_grad():
        for _ in range(steps):
            model(*[x * 3 + 1 for x in inputs])
    return model.eval()


def float64_error(model: torch.nn.Module, candidate: torch.nn.Module, *inputs) -> tuple[float, float]:
    """(max error of the float32 original, max error of the candidate), both against float64 maths."""
    ref = copy.deepcopy(model).double()(*[x.double() for x in inputs])
    original = (model(*inputs).double() - ref).abs().max().item()
    fused = (candidate(*inputs).double() - ref).abs().max().item()
    return original, fused


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, [str(a) for a in args])


CPU_SECONDS = 60  # what one honest command may spend: importing torch is ~3 s of it


def bounded(cpu_seconds: int = CPU_SECONDS, memory: int | None = None):
    """A preexec_fn for subprocess: the child gets `cpu_seconds` of CPU time (RLIMIT_CPU: SIGXCPU, then SIGKILL a
    little later) and, given `memory`, that many bytes of address space (RLIMIT_AS). Tests bound work this way,
    never by the wall clock: a busy machine makes a command slower, never wrong."""

    def limit():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return limit


def out_of_cpu(returncode: int) -> bool:
    """The child was stopped by its RLIMIT_CPU (SIGXCPU, or the SIGKILL at the hard limit)."""
    return returncode in (-signal.SIGXCPU, -signal.SIGKILL)


@contextlib.contextmanager
def plugin_registered(monkeypatch, folder, name: str, source: str):
    """A target module written to `folder` and named in registry.PLUGINS, as a third party would add one; the
    registry's caches are rebuilt on the way in and out."""
    from fcexport import registry

    caches = (registry._plugins, registry.exporters, registry.runtimes, registry.artifacts, registry.backends, registry.suffixes)
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(registry, "PLUGINS", (*registry.PLUGINS, name))
    for cached in caches:
        cached.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        for cached in caches:
            cached.cache_clear()
        sys.modules.pop(name, None)
