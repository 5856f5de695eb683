"""Exporter and runtime: a program -> model.pt2, torch.export's ExportedProgram (dynamic batch, spec as an extra file).

model.pt2 is torch.export.save's archive, so `torch.export.load` reads it where the file is trusted. fcx never
calls that: it unpickles (and falls back to `weights_only=False`). The runtime instead rebuilds the program from
the model.pt the file names (data, checked as it is read), exports it again, requires the result to equal the
file record for record, and runs that ExportedProgram: what runs is exactly what the file holds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec
from fcexport.targets import (METADATA_FILE, Checks, Exporter, ExportSettings, Predictor, Refused, Runtime,
                              archive_description, archive_fingerprint, quiet_warnings, tapped_layers, torch_device,
                              torch_precision, torch_runner)

FILE = "model.pt2"


def exported_program(program, spec: ModelSpec, device=None):
    """torch.export of the program's interpreter with a symbolic batch (on `device`, a torch.device: CPU when None);
    source locations are dropped (they name this machine's paths and would make two machines' exports differ)."""
    import torch

    from fcexport.program import ProgramModule

    example = torch.rand(2, *spec.input_shape, generator=torch.Generator().manual_seed(0))  # batch >= 2: not specialised
    try:
        with quiet_warnings():
            exported = torch.export.export(ProgramModule(program, every_output=True).eval().to(device), (example.to(device),),
                                           dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise FcxError(f"torch.export cannot export this model ({type(exc).__name__}: {first}); use model.onnx") from exc
    for node in exported.graph.nodes:
        node.meta.pop("stack_trace", None)
    return exported


def pt2_bytes(exported, spec: ModelSpec) -> bytes:
    import torch

    buffer = io.BytesIO()
    with quiet_warnings():
        torch.export.save(exported, buffer, extra_files={METADATA_FILE: json.dumps(spec.to_dict())})
    return buffer.getvalue()


def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
    from fcexport.files import write_bytes_atomic

    write_bytes_atomic(stage / FILE, pt2_bytes(exported_program(program, spec), spec))


def pt2_fingerprint(data: bytes, path: Path | str = FILE) -> tuple[ModelSpec, dict[str, str]]:
    """(spec, fingerprint) of a pt2 archive from its bytes: graph, weights, constants, sample inputs, unloaded."""
    return archive_fingerprint(data, path, f"extra/{METADATA_FILE}", lambda name: name == ".data/serialization_id",
                               _canonical_graph)


GRAPH_RECORD = "models/model.json"


def _canonical_graph(name: str, body: bytes) -> bytes:
    """The serialised graph without the storage offsets of its example tensors: metadata of the trace, not of the
    computation, that torch.export fills differently from one export to the next (seen: torchvision's swin_t,
    slice_scatter outputs at offset 2744 in one export and 0 in the next, in one process)."""
    if name != GRAPH_RECORD:
        return body
    graph = json.loads(body)
    for value in graph.get("graph_module", {}).get("graph", {}).get("tensor_values", {}).values():
        if isinstance(value, dict) and "storage_offset" in value:
            value["storage_offset"] = None
    return json.dumps(graph, sort_keys=True).encode()


def open_pt2(files: tuple[Path, ...], device: str, checks: Checks, backend: str) -> Predictor:
    """Vet the file, rebuild it from the model.pt it came from (`checks.source`), and run the rebuilt program
    only when its archive equals the file's."""
    path = files[0]
    dev = torch_device(device)
    data = checks.read(path)
    spec, found = pt2_fingerprint(data, path)
    checks.vet(path, backend, spec, found)
    if checks.source is None:
        raise FcxError(f"{path}: fcx runs model.pt2 by rebuilding it from the model.pt it was exported from "
                       "(torch.export.load unpickles): keep it in its exported folder")
    try:
        program = checks.source(spec)
    except FcxError as exc:
        raise FcxError(f"{path}: {exc}", hint=exc.hint) from exc
    exported = exported_program(program, spec)
    _, rebuilt = pt2_fingerprint(pt2_bytes(exported, spec), path)
    if rebuilt != found:
        changed = sorted(k for k in {*found, *rebuilt} if found.get(k) != rebuilt.get(k))
        raise Refused(path, [f"it is not what its model.pt exports to ({', '.join(changed[:3])} differ)"])
    module = exported.module().to(dev)  # an ExportedProgram's module is inference-only already (no .eval())
    return Predictor(backend, device, path, torch_runner(module, dev), spec, precision=torch_precision(device),
                     layers=exported_layers(program, spec, dev))


def exported_layers(program, spec: ModelSpec, dev, prepare=lambda tap: tap) -> tuple:
    """A Predictor's `layers` for model.pt2's runtime: the program's LayerTap (after `prepare`, where a test breaks
    one layer) exported by torch.export for the batch at hand and run as model.pt2 runs."""
    import torch

    from fcexport.program import LayerTap

    def run_tap(x):
        with quiet_warnings():
            exported = torch.export.export(prepare(LayerTap(program)).eval(), (torch.from_numpy(x),))
        return torch_runner(exported.module().to(dev), dev)(x)

    return tapped_layers(program, spec, run_tap)


EXPORTER = Exporter(name="pt2", files=(FILE,), format="pt2", write=write, fingerprint=lambda data: pt2_fingerprint(data)[1],
                    summary="torch.export ExportedProgram (dynamic batch): TorchScript's successor",
                    describe=archive_description(pt2_fingerprint))
RUNTIME = Runtime(name="torch-export", format="pt2", devices=("cpu", "cuda"), open=open_pt2, runs={"pt2": "pt2"},
                  summary="torch.export's ExportedProgram, rebuilt from model.pt (never unpickled)")
