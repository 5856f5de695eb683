"""`make gpu-check`: every CUDA path of fcexport in one prepared run on a lent GPU machine, and one report.

Installs fcexport without the network (pip --no-deps --no-index; wheels from .gpu-wheels/ for what the machine lacks),
then runs the cuda tests and, for the MLP, the CNN, resnet18 and efficientnet_b0 at 224 px: train or import, fuse-bn
--verify --device cuda, export (with the AOTInductor packages), verify --devices cpu,cuda and bench on both devices.
Every row, error, rule and timing goes to one Markdown report (`$OUT/gpu-report.md` when $OUT is set, else
artifacts/gpu-check/gpu-report.md), rewritten after each step so a run cut short still reports what it did.
`--dry-run`: the same steps on the CPU with tiny sizes (`make gpu-check DRY=1`; make test runs it, so it cannot rot).

Standard library only: it must run before fcexport is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"
# import name -> distribution, for what fcexport needs beyond the device machine's packages (its README: .gpu-wheels)
NEEDED = {"pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "pygments": "pygments", "packaging": "packaging",
          "setuptools": "setuptools"}


@dataclass
class Step:
    """One command of the check and what came of it."""

    title: str
    argv: list[str]
    limit: float
    rc: int | None = None
    seconds: float = 0.0
    output: str = ""
    result: dict | list | None = None  # its --json, parsed
    notes: list[str] = field(default_factory=list)


@dataclass
class Check:
    """The whole run: its steps, a deadline over all of them, and where the report goes."""

    dry: bool
    deadline: float
    report: Path
    work: Path
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def run(self, title: str, argv: list[str], limit: float, json_file: Path | None = None) -> Step:
        """Run one command with the smaller of its limit and the time left; parse its JSON (stdout, or `json_file`)."""
        step = Step(title, argv, limit)
        self.steps.append(step)
        left = self.deadline - time.monotonic()
        if left < 10:
            step.notes.append("not run: the check's time budget is spent")
            self.write()
            return step
        started = time.monotonic()
        try:
            env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crash in native code still names where it happened
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=min(limit, left), env=env)
            step.rc, step.output = done.returncode, done.stdout + done.stderr
            text = json_file.read_text() if json_file and json_file.is_file() else done.stdout
            try:
                step.result = json.loads(text)
            except ValueError:
                pass
        except subprocess.TimeoutExpired as exc:
            step.rc, step.output = None, f"{exc.stdout or ''}{exc.stderr or ''}"
            step.notes.append(f"stopped after {min(limit, left):.0f} s")
        step.seconds = time.monotonic() - started
        self.write()
        return step

    def write(self) -> None:
        self.report.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.report.with_suffix(".tmp")
        temporary.write_text(render(self))
        temporary.replace(self.report)


def fcx() -> list[str]:
    """The fcx command: the installed script beside this Python, else the package run as a module from the tree."""
    script = Path(sys.executable).with_name("fcx")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli.main"]


def install(check: Check) -> None:
    """fcexport from this tree, its dependencies taken as they are; missing helpers from .gpu-wheels (no network)."""
    import importlib.util

    missing = [dist for name, dist in NEEDED.items() if importlib.util.find_spec(name) is None]
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS), "--no-deps"]
    os.environ.setdefault("PIP_BREAK_SYSTEM_PACKAGES", "1")  # a machine lent for one check: its system Python is ours
    if missing:
        check.run(f"install {', '.join(missing)} from .gpu-wheels", pip + [str(w) for w in wheels
                                                                          if any(w.name.startswith(f"{d}-") for d in missing)], 120)
    if shutil.which("fcx") is None and not Path(sys.executable).with_name("fcx").is_file():
        step = check.run("install fcexport (--no-deps --no-index, editable)", pip + ["-e", str(ROOT)], 180)
        if step.rc != 0:
            step.notes.append("fcx runs from the tree instead (python -m cli.main)")


def machine_facts(check: Check) -> None:
    facts = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
             "cpus": str(os.cpu_count())}
    probe = ("import json, torch, onnxruntime, numpy; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': str(torch.version.cuda), 'gpu': torch.cuda.get_device_name(0) if c else 'none', "
             "'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    try:
        facts |= json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        facts["probe"] = (done.stdout + done.stderr)[-300:]
    for name in ("openvino", "model_signing", "tritonclient", "OpenSSL", "timm", "torchvision", "transformers"):
        facts[name] = "present" if __import__("importlib.util").util.find_spec(name) else "absent"
    check.facts = facts


RESNET_WEIGHTS = """
import sys, torch, torchvision
torch.manual_seed(0)
model = getattr(torchvision.models, sys.argv[1])(num_classes=10)
for m in model.modules():  # BatchNorm statistics that are not the identity, so folding has something to prove
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
torch.save(model.state_dict(), sys.argv[2])
"""


TF32_PROBE = """
import sys, torch
from fcexport.targets import exact_float32
device = sys.argv[1]
torch.manual_seed(0)
conv = torch.nn.Conv2d(64, 64, 3).to(device)
x = torch.rand(8, 64, 56, 56, device=device)
reference = torch.nn.functional.conv2d(x.double().cpu(), conv.weight.double().cpu(), conv.bias.double().cpu())
def error(y):
    return float(((y.double().cpu() - reference).abs().max() / reference.abs().max()))
with torch.inference_mode():
    default = error(conv(x))
    with exact_float32():
        exact = error(conv(x))
print(f"default settings: {default:.1e}; exact_float32: {exact:.1e}; after: {error(conv(x)):.1e} (TF32 is ~1e-3, float32 ~1e-6)")
"""


def model_steps(check: Check, name: str, make: list[str] | None, torchvision_model: str | None, shape: str, inputs: int,
                formats: str) -> None:
    """One model through train-or-import -> fuse-bn --verify -> export -> verify -> bench (cpu and the device)."""
    folder = check.work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    art = ["--artifacts", str(folder)]
    if make is not None:
        made = check.run(f"{name}: train on {check.device}", fcx() + ["train", *make, "--device", check.device, *art, "--json"], 180)
    else:
        weights = folder / "weights.pt"
        check.run(f"{name}: weights", [sys.executable, "-c", RESNET_WEIGHTS, torchvision_model, str(weights)], 120)
        made = check.run(f"{name}: import", fcx() + ["import", str(weights), "--model-def", f"torchvision.models:{torchvision_model}",
                                                   "--model-args", '{"num_classes": 10}', "--input-shape", shape, *art], 240)
    if made.rc != 0:
        return
    budget = ["--inputs", str(inputs)]
    check.run(f"{name}: fuse-bn --verify --device {check.device}",
              fcx() + ["fuse-bn", "--verify", "--device", check.device, *budget, *art, "--json"], 240)
    check.run(f"{name}: export --format {formats}", fcx() + ["export", "--format", formats, *art, "--json"], 300)
    report = folder / "verify.json"
    devices = ",".join(dict.fromkeys(("cpu", check.device)))
    check.run(f"{name}: verify --devices {devices}",
              fcx() + ["verify", "--devices", devices, *budget, *art, "--json-file", str(report), "-q"], 300, report)
    seconds = "0.2" if check.dry else "1"
    for device in dict.fromkeys((check.device, "cpu")):
        check.run(f"{name}: bench --device {device}", fcx() + ["bench", "--device", device, "--batch-sizes", "1,256",
                                                              "--seconds", seconds, *art, "--json"], 180)


def run_check(check: Check) -> None:
    machine_facts(check)
    install(check)
    check.write()
    # the cuda tests (on the CPU they are collected and skipped: the invocation is what the dry run proves)
    check.run("cuda tests", [sys.executable, "-m", "pytest", "-q", "-rA", "--tb=line", "-p", "no:cacheprovider", "-p", "no:logging",
                             "-m", "cuda", "tests/test_cuda.py"], 240)
    check.run("TF32 probe: a conv's max relative error against float64, by setting", [sys.executable, "-c", TF32_PROBE, check.device], 60)
    if check.dry:  # the two ways in, small: what make test can afford (tests/test_aoti.py covers the compiled target)
        model_steps(check, "mlp", ["--data", "digits", "--epochs", "1", "--hidden", "32"], None, "", 256, "all")
        model_steps(check, "resnet18", None, "resnet18", "3,32,32", 32, "all")
        return
    # the CPU package (aoti) is compiled and verified by tests/test_aoti.py on any machine; here the CUDA one
    model_steps(check, "mlp", ["--data", "digits", "--epochs", "5"], None, "", 256, "all,aoti-cuda")
    model_steps(check, "resnet18", None, "resnet18", "3,224,224", 64, "all,aoti-cuda")
    model_steps(check, "cnn", ["--data", "digits", "--model", "cnn", "--epochs", "5"], None, "", 256, "all,aoti-cuda")
    model_steps(check, "efficientnet_b0", None, "efficientnet_b0", "3,224,224", 64, "all")


# ---- the report ---------------------------------------------------------------------------------


def _num(value, spec: str = ".1e") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def parity_table(parity: dict) -> list[str]:
    lines = ["| backend | device | status | precision | max abs | x own | allowed | top-1 | why |", "|---|---|---|---|---|---|---|---|---|"]
    for r in parity.get("rows", []):
        why = r.get("reason") or "; ".join(r.get("problems", []))[:160]
        lines.append(f"| {r['backend']} | {r['device']} | {r['status']} | {r.get('precision', '-')} | {_num(r.get('max_abs'))} | "
                     f"{_num(r.get('noise_ratio'), '.2f')} | {_num(r.get('allowed_max_abs'))} | {_num(r.get('top1_agreement'), '.4f')} | {why} |")
    lines.append(f"\nrule: {parity.get('criterion')}; own float32 error {_num(parity.get('own_float32_error'))}; "
                 f"inputs: {parity.get('inputs')} ({parity.get('input_count')})")
    return lines


def step_body(step: Step) -> list[str]:
    result = step.result
    if isinstance(result, dict) and "rows" in result and "criterion" in result:  # verify
        return parity_table(result)
    if isinstance(result, dict) and result.get("verification"):  # fuse-bn
        latency = result.get("latency_ms", {})
        return parity_table(result["verification"]) + [f"\nbatch-1 latency on {latency.get('device')}: "
                                                       f"{_num(latency.get('before'), '.3f')} -> {_num(latency.get('after'), '.3f')} ms"]
    if isinstance(result, list) and result and "batch_size" in result[0]:  # bench
        lines = ["| backend | device | batch | precision | p50 ms | samples/s |", "|---|---|---|---|---|---|"]
        for r in result:
            if r.get("status") == "skipped":
                lines.append(f"| {r['backend']} | {r['device']} | - | - | skipped | {r.get('reason', '')[:100]} |")
            else:
                lines.append(f"| {r['backend']} | {r['device']} | {r['batch_size']} | {r.get('precision')} | "
                             f"{_num(r.get('p50_ms'), '.3f')} | {_num(r.get('throughput'), ',.0f')} |")
        return lines
    if isinstance(result, dict) and "written" in result:  # export
        lines = [f"written: {', '.join(Path(w).name for w in result['written'])}"]
        lines += [f"not written: {k}: {v}" for k, v in result.get("skipped", {}).items()]
        return lines + (parity_table(result["check"]) if result.get("check") else [])
    if step.rc == 0 and step.title.startswith("TF32 probe"):
        return [step.output.strip()]
    if isinstance(result, dict) and "test_accuracy" in result:  # train
        return [f"device {result.get('device')}, test accuracy {_num(result.get('test_accuracy'), '.4f')}, "
                f"{_num(result.get('train_seconds'), '.1f')} s"]
    tail = step.output.strip().splitlines()[-25:]
    return ["```", *tail, "```"] if tail else []


def render(check: Check) -> str:
    failed = [s.title for s in check.steps if s.rc not in (0,)]
    lines = [f"# fcexport GPU check{' (dry run on the CPU)' if check.dry else ''}", "",
             " · ".join(f"{k} {v}" for k, v in check.facts.items()), "",
             f"steps: {len(check.steps)}, failed or not run: {len(failed)}" + (f" ({'; '.join(failed)})" if failed else ""), ""]
    for step in check.steps:
        status = "ok" if step.rc == 0 else "not run" if step.rc is None and not step.seconds else f"exit {step.rc}"
        command = " ".join(Path(a).name if a.startswith("/") else a for a in step.argv).splitlines()[0][:300]
        lines += [f"## {step.title}: {status}, {step.seconds:.1f} s", "", f"`{command}`", ""]
        lines += [f"- {note}" for note in step.notes]
        lines += step_body(step) + [""]
        if step.rc != 0 and step.output and isinstance(step.result, (dict, list)):  # a table, and why it failed
            lines += ["```", *step.output.strip().splitlines()[-15:], "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run the steps on the CPU with tiny sizes")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    parser.add_argument("--report", type=Path, help="where the report goes [default: $OUT/gpu-report.md]")
    parser.add_argument("--work", type=Path, help="where the models go [default: artifacts/gpu-check]")
    args = parser.parse_args(argv)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "artifacts" / "gpu-check"
    report = args.report or out / ("gpu-report-dry.md" if args.dry_run else "gpu-report.md")
    work = args.work or ROOT / "artifacts" / ("gpu-check-dry" if args.dry_run else "gpu-check")
    check = Check(args.dry_run, time.monotonic() + args.budget, report, work)
    run_check(check)
    check.write()
    print(f"report: {report}")
    return 0 if all(s.rc == 0 for s in check.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
