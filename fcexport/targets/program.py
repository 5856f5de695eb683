"""Runtime: fcexport's own interpreter (fcexport.program.ProgramModule) on model.pt and model.fused.pt.

Both files are data, checked as they are read (fcexport.checkpoint); nothing in them is code.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from fcexport.spec import ModelSpec
from fcexport.targets import Checks, Predictor, Runtime, chunk_size, exact_float32, module_predictor


def program_predictor(program, backend: str, device: str, source: Path, spec: ModelSpec, batch: int | None = None) -> Predictor:
    """Run a program through a fresh interpreter of its own on `device` (the program itself is not moved)."""
    import torch

    from fcexport.program import ProgramModule, layer_values

    module = ProgramModule(program, every_output=True)
    predictor = module_predictor(module, backend, device, source, spec, batch)
    dev = torch.device(predictor.device)

    def layers(x: np.ndarray) -> dict:
        with exact_float32():
            return {name: (kind, value.float().cpu().numpy())
                    for name, (kind, value) in layer_values(module, torch.from_numpy(x).to(dev)).items()}

    return replace(predictor, layers=(program, layers))


def float64_logits(program, x: np.ndarray, peak_bytes: int = 0) -> np.ndarray:
    """The reference: the program run in float64 on the CPU (every float32 tensor and op widened)."""
    return float64_outputs(program, x, peak_bytes)[0]


def float64_outputs(program, x: np.ndarray, peak_bytes: int = 0) -> tuple[np.ndarray, ...]:
    """float64_logits and every other output (program.extras) after them, in one pass, in chunks of what a float32
    call takes in bytes (`peak_bytes`: spec.peak_bytes)."""
    import torch

    from fcexport.program import ProgramModule

    batch = chunk_size(x.shape[1:], peak_bytes, itemsize=8)
    module = ProgramModule(program, every_output=True).double().eval()
    with torch.inference_mode():
        parts = [module(torch.from_numpy(x[i : i + batch]).double()) for i in range(0, len(x), batch)]
    parts = [part if isinstance(part, tuple) else (part,) for part in parts]
    if not parts:
        return tuple(np.zeros((0,), dtype=np.float64) for _ in range(1 + len(program.extras)))
    return tuple(np.concatenate([part[k].numpy() for part in parts]) for k in range(len(parts[0])))


def every_answer(program, spec, source: Path, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """For every output, the logits first: (its float64 values for `x`, the program's own float32 max abs error per
    input there: the yardstick), as fcexport.machine_cache.answers records them. The own error is the larger of two
    draws of float32 rounding: on `x` and on `x` moved by one float32 step (nudged). A well-conditioned model's two
    draws agree within half (0.96-1.41x measured); an ill-conditioned one's (random-weight visformer: logits of 5,000, own error
    1.7 to 629 by the draw of its weights) differ by more than the rule's factor, which one draw would not show.
    Every call is a whole chunk (the last filled with copies of the first input): BLAS picks its kernels by the batch
    (a Linear's rows differ by a float32 step below 8 a call), so an input's answers are the same whatever batch it
    comes in, and a verdict the same whatever was recorded before it."""
    def whole_chunks(itemsize: int) -> np.ndarray:
        pad = -len(x) % chunk_size(spec.input_shape, spec.peak_bytes, itemsize)
        return np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if len(x) and pad else x

    wide = whole_chunks(8)
    exact = (float64_outputs(program, wide, spec.peak_bytes) if program.extras
             else (float64_logits(program, wide, spec.peak_bytes),))
    predictor = program_predictor(program, "eager", "cpu", source, spec)
    filled = whole_chunks(4)
    draws = (predictor.outputs(filled), predictor.outputs(nudged(filled)))
    return [(values[: len(x)], np.maximum(*(np.abs(mine[: len(x)].astype(np.float64) - values[: len(x)])
                                            .reshape(len(x), -1).max(axis=1, initial=0.0) for mine in draw)))
            for values, *draw in zip(exact, *draws, strict=True)]


def nudged(x: np.ndarray) -> np.ndarray:
    """`x` with every value moved one float32 step up or down, by a fixed pattern per image shape: each input's second
    draw is the same whatever batch it comes in."""
    steps = np.random.default_rng(0).choice(np.array([-1.0, 1.0], dtype=np.float32), size=x.shape[1:])
    return (x * (1 + steps * np.finfo(np.float32).eps)).astype(x.dtype)


def float64_answers(program, spec, source: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """every_answer's logits: (float64 logits for `x`, own float32 max abs error per input)."""
    return every_answer(program, spec, source, x)[0]


def reference_layers(program, x: np.ndarray) -> tuple[dict, dict]:
    """Each layer's output for `x` on the CPU in float64 (the reference) and in float32 (its own rounding noise)."""
    import torch

    from fcexport.program import ProgramModule, layer_values

    module = ProgramModule(program)
    float32 = {name: value.numpy() for name, (_, value) in layer_values(module, torch.from_numpy(x)).items()}
    float64 = {name: value.numpy() for name, (_, value) in layer_values(module.double(), torch.from_numpy(x).double()).items()}
    return float64, float32


def open_checkpoint(files: tuple[Path, ...], device: str, checks: Checks, backend: str) -> Predictor:
    """An fcexport model .pt (data, checked as it is read); `checks` see its spec and fingerprint first."""
    from fcexport.checkpoint import read_model
    from fcexport.program import fingerprint

    path = files[0]
    stored = read_model(path, checks.read(path))
    if backend == "eager" and stored.spec.provenance.fused:
        backend = "fused"  # a fused model under another name
    checks.vet(path, backend, stored.spec, fingerprint(stored.program))
    return program_predictor(stored.program, backend, device, path, stored.spec)


RUNTIME = Runtime(name="torch", format="fcexport", devices=("cpu", "cuda"), open=open_checkpoint,
                  runs={"eager": "model", "fused": "fused"}, summary="fcexport's interpreter over the stored program (eager PyTorch)")
