"""What the commands return: small frozen objects with a status each, turned into JSON only at the edge (`to_json`).

A status is PASS or FAIL for a check, OK for a measurement, SKIPPED (with the reason) for what could not run
here; a skip is never a pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from fcexport.spec import frozen, thawed


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    OK = "ok"
    SKIPPED = "skipped"


def _no_numbers() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class TrustCheck:
    """The folder as a whole against its signature or an expected manifest digest."""

    check: str  # "signature", "digest", an exported folder's exporter (triton) or "reference.npz"
    status: Status
    detail: str

    def to_json(self) -> dict:
        return {"check": self.check, "status": self.status.value, "detail": self.detail}


@dataclass(frozen=True)
class CheckRow:
    """One backend on one device against the reference: its numbers (fcexport.compare), or why it was skipped, and
    the integrity / structure problems that fail it whatever the numbers say."""

    backend: str
    device: str
    status: Status
    source: str | None = None
    numbers: Mapping[str, Any] = field(default_factory=_no_numbers)
    problems: tuple[str, ...] = ()
    reason: str | None = None  # why it was skipped
    hint: str | None = None  # the errors.HINTS step that would let it run

    def __post_init__(self):
        object.__setattr__(self, "numbers", frozen(self.numbers))
        object.__setattr__(self, "problems", tuple(self.problems))

    def value(self, name: str):
        return self.numbers.get(name)

    def to_json(self) -> dict:
        row = {"backend": self.backend, "device": self.device, "status": self.status.value}
        if self.status is Status.SKIPPED:
            return row | {"reason": self.reason, "hint": self.hint}
        row |= ({"source": self.source} if self.source is not None else {}) | thawed(self.numbers)
        row |= {"reason": self.reason} if self.reason else {}  # a file refused before it was loaded: why
        return row | ({"problems": list(self.problems)} if self.problems else {})


@dataclass(frozen=True)
class ParityReport:
    """Every candidate against the float64 reference, on the inputs described."""

    rows: tuple[CheckRow, ...]
    criterion: str
    own_float32_error: float
    tolerance: Any  # fcexport.compare.Tolerance
    inputs: str
    input_count: int
    reference_accuracy: float | None
    weak: str | None = None  # the inputs prove less than a verdict needs (--inputs below the minimum)

    @property
    def ran(self) -> int:
        return sum(r.status is not Status.SKIPPED for r in self.rows)

    @property
    def passed(self) -> bool:
        """Passed only when something ran and everything that ran passed."""
        return self.ran > 0 and all(r.status is Status.PASS for r in self.rows if r.status is not Status.SKIPPED)

    def to_json(self) -> dict:
        t = self.tolerance
        return {"passed": self.passed, "ran": self.ran, "criterion": self.criterion, "own_float32_error": self.own_float32_error,
                "noise_factor": t.factor, "atol": t.atol, "rtol": t.rtol, "int8_min_agreement": t.min_agreement,
                "int8_max_accuracy_drop": t.max_accuracy_drop, "inputs": self.inputs, "input_count": self.input_count,
                "weak": self.weak, "reference_accuracy": self.reference_accuracy, "rows": [r.to_json() for r in self.rows]}


@dataclass(frozen=True)
class VerifyReport:
    """fcx verify: the trust checks, then (when they pass) the parity of every backend x device."""

    trust: tuple[TrustCheck, ...]
    parity: ParityReport | None  # None: a trust check failed, so nothing in the folder was loaded

    @property
    def trust_failed(self) -> list[str]:
        return [c.check for c in self.trust if c.status is Status.FAIL]

    @property
    def rows(self) -> tuple[CheckRow, ...]:
        return self.parity.rows if self.parity else ()

    @property
    def ran(self) -> int:
        return self.parity.ran if self.parity else 0

    @property
    def passed(self) -> bool:
        return not self.trust_failed and self.parity is not None and self.parity.passed

    def to_json(self) -> dict:
        trust = [c.to_json() for c in self.trust]
        if self.parity is None:
            return {"passed": False, "ran": 0, "trust": trust, "rows": []}
        return {"trust": trust, **self.parity.to_json()}


@dataclass(frozen=True)
class BenchRow:
    """One backend at one batch size: latency percentiles and throughput, or why it was skipped."""

    backend: str
    device: str
    status: Status  # OK or SKIPPED
    batch_size: int | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    throughput: float | None = None  # samples per second at p50
    calls: int | None = None  # timed calls behind the percentiles
    warmup_calls: int | None = None  # untimed calls before them (fewer than asked when the time budget ran out)
    precision: str | None = None  # what the backend computed in (float32; on CUDA "float32 (TF32 off)"; int8, bf16)
    reason: str | None = None
    hint: str | None = None

    def to_json(self) -> dict:
        row = {"backend": self.backend, "device": self.device, "batch_size": self.batch_size, "status": self.status.value}
        if self.status is Status.SKIPPED:
            return row | {"reason": self.reason, "hint": self.hint}
        return row | {"p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "throughput": self.throughput, "calls": self.calls,
                      "warmup_calls": self.warmup_calls, "precision": self.precision}


@dataclass(frozen=True)
class FuseResult:
    """fcx fuse-bn: what was folded (fcexport.folding.FuseReport), batch-1 latency before and after in fcexport's
    interpreter (None: too slow to time fairly in a second), the verification when asked for, and whether the fused
    model was written."""

    source: str
    output: str
    report: Any  # fcexport.folding.FuseReport
    latency_before_ms: float | None
    latency_after_ms: float | None
    device: str
    verification: ParityReport | None
    written: bool

    def to_json(self) -> dict:
        return {"source": self.source, "output": self.output, "written": self.written, "report": self.report.as_dict(),
                "latency_ms": {"before": self.latency_before_ms, "after": self.latency_after_ms, "device": self.device},
                "verification": self.verification.to_json() if self.verification else None}


@dataclass(frozen=True)
class ExportResult:
    """fcx export: files written and removed, formats skipped (name -> why), the manifest and its sha256."""

    written: tuple[str, ...]
    removed: tuple[str, ...]
    skipped: Mapping[str, str]
    manifest: str
    manifest_sha256: str
    signature: str | None
    fused: bool
    folds: tuple
    check: ParityReport | None = None  # each written file run on a few inputs against model.pt (None: --no-check)

    @property
    def passed(self) -> bool:
        return self.check is None or self.check.passed or not self.check.ran

    def to_json(self) -> dict:
        return {"written": list(self.written), "removed": list(self.removed), "skipped": dict(self.skipped),
                "manifest": self.manifest, "manifest_sha256": self.manifest_sha256, "signature": self.signature,
                "fused": self.fused, "folds": thawed(self.folds), "check": self.check.to_json() if self.check else None}


@dataclass(frozen=True)
class FileReport:
    """One model file as fcx inspect sees it, read but never run: its spec and format details, and whether the
    folder's manifest vouches for it (`manifest`), or why it could not be read (`problem`)."""

    file: str
    artifact: str | None
    size: int
    manifest: str
    spec: Any = None  # fcexport.spec.ModelSpec
    details: Mapping[str, Any] = field(default_factory=_no_numbers)
    problem: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "details", frozen(self.details))

    def to_json(self) -> dict:
        return {"file": self.file, "artifact": self.artifact, "bytes": self.size, "manifest": self.manifest,
                "spec": self.spec.to_dict() if self.spec is not None else None, "details": thawed(self.details),
                "problem": self.problem}


@dataclass(frozen=True)
class Inspection:
    """fcx inspect: every model file of a folder (or the one named), the manifest's digest and the signature's presence."""

    folder: str
    files: tuple[FileReport, ...]
    manifest_sha256: str | None
    signature: str | None  # the signature file, when there is one (fcx verify --public-key checks it)

    def to_json(self) -> dict:
        return {"folder": self.folder, "manifest_sha256": self.manifest_sha256, "signature": self.signature,
                "files": [f.to_json() for f in self.files]}
