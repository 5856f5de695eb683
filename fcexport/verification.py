"""fcx verify's checks, in one place: the folder against its signature or digest (trust), each file against the
manifest before it is read (vouched reading), each artifact against a fresh export of model.pt (structure), and the
numbers against model.pt in float64 (`numbers`, also behind fuse-bn --verify, export's self-check and verify --url).

`pipeline.verify` only orchestrates: it reads model.pt, calls these in order and opens the runtimes. A new kind of
check is one function here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcexport import artifacts as names
from fcexport import parity, registry
from fcexport.compare import Tolerance, accuracy, allowed_error
from fcexport.errors import FcxError
from fcexport.results import Status, TrustCheck
from fcexport.targets import RANDOM_CALIBRATION, DeviceUnavailable, ExportSettings, Refused, Unsupported


def trust_checks(artifacts: Path, public_key: Path | None, signature: Path | None, expect_digest: str | None) -> list[TrustCheck]:
    """Whether the folder is exactly what was signed (given a public key) and what the digest kept elsewhere
    names: one row each, status pass / fail / skipped with the reason."""
    rows = []
    signature = Path(signature) if signature is not None else artifacts / names.SIGNATURE
    if public_key is not None:
        why = names.check_signature(artifacts, Path(public_key), signature)
        rows.append(TrustCheck("signature", Status.FAIL if why else Status.PASS,
                               why or f"every file in {artifacts} is what {Path(public_key).name}'s owner signed ({signature.name})"))
    elif signature.is_file():
        rows.append(TrustCheck("signature", Status.SKIPPED, f"{signature.name} not checked: no public key given"))
    if expect_digest is not None:
        why = names.check_digest(artifacts, expect_digest)
        rows.append(TrustCheck("digest", Status.FAIL if why else Status.PASS,
                               why or f"{names.MANIFEST} has the expected sha256 and every file it lists matches it"))
    return rows


def manifest_vouch(folder: Path, manifest: dict | None, model_sha256: str | None):
    """A Checks.vouch for the files of `folder`: why the bytes read from one are not what its manifest lists for
    this model.pt (not listed, changed, made from another model.pt), or None."""

    def vouch(path: Path, data: bytes) -> str | None:
        return names.check_against_manifest(path, manifest, model_sha256, data, names.manifest_name(folder, path))

    return vouch


class VouchedReader:
    """Reads files of an artifacts folder for a check, each once, and vouches for the bytes read: listed in the
    folder's manifest, unchanged, made from this model.pt (`model_sha256`). A file that fails is never returned."""

    def __init__(self, folder: Path, manifest: dict | None, model_sha256: str | None):
        self.folder, self.manifest, self.read = Path(folder), manifest, {}
        self.vouch = manifest_vouch(self.folder, manifest, model_sha256)

    def __call__(self, path: Path) -> bytes:
        from fcexport.targets import read_bytes

        path = Path(path)
        if path not in self.read:
            name = names.manifest_name(self.folder, path)
            if self.manifest is not None and (problem := names.listing_problem(path, self.manifest, name)):
                raise Refused(path, [problem], problem, hint="export")  # unlisted or resized: not a byte read
            data = read_bytes(path)
            if self.manifest is not None and (problem := self.vouch(path, data)):
                raise Refused(path, [problem], problem, hint="export")
            self.read[path] = data
        return self.read[path]

    def every(self, files) -> list[str]:
        """Read each of `files` (relative to the folder): the problems of those that fail. A file no check would
        read (one planted in a folder) is judged too."""
        problems = []
        for file in files:
            try:
                self(self.folder / file)
            except FcxError as exc:
                problems.append(str(exc))
        return problems


def folder_checks(artifacts: Path, manifest: dict | None, model_sha256: str) -> list[TrustCheck]:
    """One row per exported folder (a Triton repository): every file in it matches the manifest and came from this
    model.pt, and the exporter's own check of the set (configs against the graphs they serve) passes."""
    rows = []
    for name, exporter in registry.exporters().items():
        folders = [entry for entry in exporter.files if entry.endswith("/")]
        linked = [f"{entry} is a symbolic link; fcexport reads it only as the folder export wrote"
                  for entry in folders if (artifacts / entry).is_symlink()]
        files = names.artifact_files(artifacts, folders)
        if (not files and not linked) or exporter.check is None:
            continue
        read = VouchedReader(artifacts, manifest, model_sha256)
        problems = linked or read.every(files)
        if not problems:
            problems = exporter.check(artifacts, read)
        where = ", ".join(folders)
        rows.append(TrustCheck(name, Status.FAIL if problems else Status.PASS,
                               "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
                               if problems else f"{where}: {len(files)} files match {names.MANIFEST} and come from this model.pt; the set checks"))
    return rows


class FreshExports:
    """What each artifact must contain: a fresh export of this model.pt with the artifact's own settings (fused or not,
    opset), made once by `fingerprint_of(program, artifact, spec, settings)` or recalled from this machine's record of
    the same export (fcexport.machine_cache), compared by fingerprint (ops, wiring, every tensor and constant). Used
    as an `admit` check, so an artifact that differs is never loaded."""

    def __init__(self, model, fingerprint_of):
        self.model, self.fingerprint_of, self.fingerprints, self.programs = model, fingerprint_of, {}, {}

    def admit(self, backend: str, spec, found: dict[str, str]) -> list[str]:
        """Problems of an artifact with this spec and fingerprint: its spec against model.pt's, its contents
        against a fresh export's."""
        return parity.spec_differences(self.model.stored.spec, spec) + self.differences(backend, spec, found)

    def differences(self, backend: str, spec, found: dict[str, str] | None) -> list[str]:
        if found is None or backend == "eager":
            return []
        artifact = registry.backend(backend).artifact
        fused = spec.provenance.fused
        settings = ExportSettings(spec.provenance.opset or ExportSettings.opset, calibration=RANDOM_CALIBRATION)
        key = (artifact, fused, settings)
        if key not in self.fingerprints:
            try:
                self.fingerprints[key] = self._fingerprint(artifact, spec, fused, settings)
            except FcxError as exc:
                return [f"a fresh export of model.pt to compare with failed: {exc}"]
        problems = [f"{p} (against a fresh export of model.pt)" for p in fingerprint_differences(found, self.fingerprints[key])]
        note = versions_note(spec) if problems else None
        return problems + ([note] if note else [])

    def _fingerprint(self, artifact: str, spec, fused: bool, settings: ExportSettings) -> dict[str, str]:
        """The fresh export's fingerprint, from this machine's record of the same export when there is one."""
        from fcexport import machine_cache
        from fcexport.program import fingerprint

        program = self.model.fused[0] if fused else self.model.stored.program
        if fused not in self.programs:
            self.programs[fused] = fingerprint(program)
        if artifact == "fused":
            return self.programs[fused]
        entry = machine_cache.fresh_export_key(self.programs[fused], spec, artifact, settings.opset)
        found = machine_cache.load_fingerprint(entry)
        if found is None:
            found = self.fingerprint_of(program, artifact, spec, settings)
            machine_cache.store_fingerprint(entry, found)
        return found


def versions_note(spec) -> str | None:
    """Another exporter may write another graph: say so when the artifact was made with other versions."""
    import fcexport

    made = spec.provenance.versions
    now = {**names.versions(), "fcexport": fcexport.__version__}
    changed = [f"{k} {made.get(k)} (now {v})" for k, v in now.items() if made.get(k) not in (None, v)]
    return f"it was exported with {', '.join(changed)}: export it again with these versions" if changed else None


def fingerprint_differences(found: dict[str, str], expected: dict[str, str], limit: int = 3) -> list[str]:
    """What an artifact holds that a fresh export does not, and the other way round (first few of each)."""
    changed = [k for k in expected if k in found and found[k] != expected[k]]
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    problems = []
    for label, keys in (("differs", changed), ("is missing", missing), ("is extra", extra)):
        if keys:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            problems.append(f"{', '.join(keys[:limit])}{more} {label}")
    return problems


def open_candidates(backends, devices, open_one, on_step=None) -> tuple[list, list[list[str]]]:
    """Each backend x device opened by `open_one(backend, device)` (which checks the files first): (candidates, the
    integrity / structure problems of each). A file refused before it is loaded fails its row; a device or runtime
    not here, or a runtime that cannot run an honest file, is a skipped row saying so."""
    candidates, problems = [], []
    for device in devices:
        for backend in backends:
            if (backend, device) == ("eager", "cpu"):
                continue  # that is the reference itself (in float32: its error is the yardstick)
            if on_step is not None:  # the CLI's progress line
                on_step(f"checking and opening {backend} on {device}")
            try:  # a file that differs from a fresh export is refused before it is loaded (TorchScript is code)
                candidate = open_one(backend, device)
            except DeviceUnavailable as exc:
                hint = None if exc.hint == "cpu" else exc.hint  # verify chooses devices with its own option
                candidates.append(parity.Skipped(backend, device, str(exc), hint))
                problems.append([])
                continue
            except Refused as exc:
                candidates.append(parity.Skipped(backend, device, f"not loaded: {exc.summary}"))
                problems.append(exc.problems)
                continue
            except Unsupported as exc:  # an honest file this runtime cannot run: said in its row, the others judge
                candidates.append(parity.Skipped(backend, device, str(exc)))
                problems.append([])
                continue
            candidates.append(candidate)  # admitted, or made in memory from the checked model.pt
            problems.append([])
    return candidates, problems


def numbers(stored, model_path: Path, candidates: list, problems: list[list[str]], data, data_root, tolerance: Tolerance,
            on_step=None, budget: int | None = None):
    """Compare candidates with model.pt in float64, judged against model.pt's own float32 error; `problems`
    (one list per candidate: integrity, structure, spec) fail their rows whatever the numbers say. `budget` fixes
    how many inputs (--inputs, parity.checked_budget); None: parity's default budget, the same on every machine."""
    if on_step is not None:  # (else the last runtime opened would seem to take this time)
        on_step("preparing the inputs (test images, random, probes)")
    probes = parity.probe_inputs(stored.program, stored.spec, parity.probe_count(budget, stored.spec))
    inputs = parity.make_inputs(stored.spec, budget, *real_images(stored.spec, data, data_root), probes=probes)
    if on_step is not None:
        on_step(f"computing model.pt's answers in float64 ({len(inputs.x):,} inputs)")
    reference, own_error, others = float64_reference(stored, model_path, inputs.x)
    rows = parity.compare_predictors(reference, own_error, candidates, inputs, tolerance, on_step, others)
    # a file refused before loading is a failure, not a skip
    rows = [parity.with_problems(row, found) for row, found in zip(rows, problems, strict=True)]
    return parity.report(rows, inputs, reference, accuracy(reference, inputs.labels), own_error, tolerance)


def float64_reference(stored, model_path: Path, x: np.ndarray) -> tuple[np.ndarray, float, tuple]:
    """(model.pt's logits for `x` in float64, model.pt's own float32 error on them: the yardstick, and its other
    outputs as parity.OtherOutput), each recorded on this machine (fuse-bn --verify's inputs); the rows not recorded
    come from one pass over every output."""
    from fcexport import machine_cache
    from fcexport.targets.program import every_answer

    made: list = []  # (inputs, every output's answers) of the last pass: the logits' pass serves the other outputs

    def answers(index: int):
        def compute(part: np.ndarray):
            if not (made and made[0][0].shape == part.shape and np.array_equal(made[0][0], part)):
                made[:] = [(part, every_answer(stored.program, stored.spec, model_path, part))]
            return made[0][1][index]
        return compute

    reference, own = machine_cache.answers(stored.sha256, stored.spec.output_shape, x, answers(0))
    others = []
    for index, (name, shape) in enumerate(stored.spec.other_outputs, 1):
        values, own_rows = machine_cache.answers(f"{stored.sha256}/{name}", shape, x, answers(index))
        others.append(parity.OtherOutput(name, values, float(own_rows.max(initial=0.0))))
    return reference, float(own.max(initial=0.0)), tuple(others)


def real_images(spec, data: str | None, data_root: str | None):
    """(the test split of `data` or of the model's own dataset, its source, why there is none)."""
    from fcexport.data import load_dataset

    dataset = spec.dataset or {}
    source = data or dataset.get("source")
    if source is None:
        return None, None, "no dataset recorded; name one to add real images"
    try:
        test_source = None if data else dataset.get("test_source")
        test = load_dataset(source, data_root or dataset.get("root"), image_size=spec.input_shape[-1], download=False,
                            test_data=test_source).test
    except FcxError as exc:
        if data:  # the user asked for this data explicitly: a problem with it is an error
            raise
        return None, source, f"dataset not available here: {exc}"
    return test, source, None


# ---- a reference that travels ----------------------------------------------------------------

def read_reference(folder: Path, manifest: dict | None):
    """(the checked targets.reference.Reference, the model.pt sha256 it names, "weak: ..." or None) from a folder's
    reference.npz, read once and vouched for by the manifest."""
    from fcexport.targets import reference

    path = Path(folder) / reference.FILE
    if manifest is None or reference.FILE not in manifest["files"]:
        raise FcxError(f"{path}: no reference listed in {names.MANIFEST}: export again with this fcexport", hint="export")
    source = manifest["files"][reference.FILE].get("source_sha256")
    found = reference.read(VouchedReader(Path(folder), manifest, source)(path), path)
    wanted = found.spec.random_inputs
    return found, source, (f"weak: {found.count} inputs (a verdict needs {wanted})" if found.count < wanted else None)


# a stored reference's float64 answers must be model.pt's to within float64 rounding (another machine's kernels),
# its own float32 error within REFERENCE_OWN_SPREAD of this machine's either way (float32 kernels differ more)
REFERENCE_RTOL, REFERENCE_OWN_SPREAD = 1e-9, 4.0


def reference_check(artifacts: Path, manifest: dict | None, stored, model_path: Path, budget: int | None) -> TrustCheck | None:
    """reference.npz (None where the manifest lists none) against model.pt: readable as verify --reference reads it,
    its answers model.pt's own in float64 on its inputs (the first `budget` of them when verify's budget is fixed
    smaller: they are verify's own random inputs, so nothing is computed twice), its noise band this machine's: a
    reference that would fail honest files, or pass any, on a deploy host is caught where model.pt is at hand."""
    from fcexport.targets import reference

    if manifest is None or reference.FILE not in manifest["files"]:
        return None
    if not (Path(artifacts) / reference.FILE).exists():  # as a listed model file that is not here: skipped, said
        return TrustCheck(reference.FILE, Status.SKIPPED, f"{reference.FILE} is not here: run `fcx export` to write it")
    try:
        found, _, weak = read_reference(artifacts, manifest)
    except FcxError as exc:
        return TrustCheck(reference.FILE, Status.FAIL, str(exc))
    if differences := parity.spec_differences(stored.spec, found.spec):
        return TrustCheck(reference.FILE, Status.FAIL, f"{reference.FILE}: " + "; ".join(differences))
    checked = found.count if budget is None else min(found.count, budget)
    expected, own, _ = float64_reference(stored, model_path, found.inputs[:checked])
    off = float(np.abs(found.logits[:checked] - expected).max(initial=0.0))
    largest = float(np.abs(expected).max(initial=0.0))
    allowed = REFERENCE_RTOL * max(1.0, largest)
    if off > allowed:
        return TrustCheck(reference.FILE, Status.FAIL, f"{reference.FILE}: its answers are {off:.2g} from model.pt's in float64 "
                                                       f"(float64 rounding allows {allowed:.1g}): export again")
    floor = allowed_error(0.0, expected, 1.0)  # own errors below the rule's noise floor change no verdict
    if not own / REFERENCE_OWN_SPREAD - floor <= found.own_error <= own * REFERENCE_OWN_SPREAD + floor:
        return TrustCheck(reference.FILE, Status.FAIL, f"{reference.FILE}: its own float32 error {found.own_error:.2g} is not "
                                                       f"model.pt's ({own:.2g} here, within {REFERENCE_OWN_SPREAD:g}x): export again")
    return TrustCheck(reference.FILE, Status.PASS, f"model.pt's float64 answers on {checked} of its {found.count} inputs"
                      + (f" ({weak})" if weak else "") + ": verify --reference can judge a copy without model.pt")


def against_reference(candidates: list, problems: list[list[str]], reference, weak: str | None, tolerance: Tolerance):
    """Candidates judged against a stored reference (targets.reference.Reference) instead of model.pt: the same rule,
    no structure check."""
    x = reference.inputs
    inputs = parity.Inputs(x, None, f"{len(x)} seeded random inputs of reference.npz (no model.pt, no structure check)", weak)
    rows = parity.compare_predictors(reference.logits, reference.own_error, candidates, inputs, tolerance)
    rows = [parity.with_problems(row, found) for row, found in zip(rows, problems, strict=True)]
    return parity.report(rows, inputs, reference.logits, None, reference.own_error, tolerance)
