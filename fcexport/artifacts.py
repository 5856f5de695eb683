"""An artifacts folder: which files each backend reads, the manifest, its signature, and which files are stale.

The artifacts and backends themselves are declared in fcexport.registry; this module says what a folder
holds and whether each file can be trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

from fcexport import registry
from fcexport.errors import FcxError
from fcexport.files import sha256_file, write_json_atomic
from fcexport.registry import FUSED, MODEL

MANIFEST = "manifest.json"
SIGNATURE = "model.sig"  # the OpenSSF Model Signing default name
# Read caps, checked before a byte is read: a manifest lists at most MAX_FOLDER_FILES entries of ~250 bytes; a
# signature is a sigstore bundle over one digest per file; a PEM elliptic-curve key is a few hundred bytes.
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = 16 << 20
MAX_KEY_BYTES = 64 << 10
# What predict uses when not told (artifact names, best first). TorchScript is never picked unasked: loading it
# runs code from the file; model.pt2 is rebuilt from model.pt, so model.pt is as good and cheaper.
DEFAULT_ORDER = ("onnx", "fused", "model")


def find_default_model(artifacts: Path) -> Path:
    """The best artifact present: ONNX, then the fused model, then the model."""
    names = [registry.artifacts()[a][0] for a in DEFAULT_ORDER]
    for name in names:
        if (artifacts / name).is_file():
            return artifacts / name
    raise FcxError(f"{artifacts}: no model found ({', '.join(names)})", hint="train-or-import")


def read_manifest(folder: Path) -> dict | None:
    """manifest.json as a dict, None when there is none; a damaged one is an error."""
    found = read_manifest_bytes(folder)
    return None if found is None else found[0]


def read_manifest_bytes(folder: Path) -> tuple[dict, str] | None:
    """(manifest.json as a dict, the sha256 of the bytes parsed), read once; None when there is none."""
    from fcexport.targets import read_bytes

    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    data = read_bytes(path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FcxError(f"{path}: unreadable manifest ({type(exc).__name__})", hint="export") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise FcxError(f"{path}: not an fcexport manifest (no 'files')", hint="export")
    return manifest, hashlib.sha256(data).hexdigest()


MAX_FOLDER_FILES = 10_000  # files listed under one folder entry of an artifact (a Triton repository holds a few)


def artifact_files(folder: Path, entries) -> list[str]:
    """The files `entries` (an artifact's relative paths; one ending in '/' is a whole folder) name in `folder`
    that exist, as manifest keys (relative paths); symlinks and hidden names (temp files) are never listed."""
    folder, found = Path(folder), []
    for entry in entries:
        if not entry.endswith("/"):
            if (folder / entry).is_file():
                found.append(entry)
            continue
        top = folder / entry
        if not top.is_dir() or top.is_symlink():
            continue
        for path in sorted(top.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not path.is_symlink() and not any(p.startswith(".") for p in relative.parts):
                found.append(relative.as_posix())
                if len(found) > MAX_FOLDER_FILES:
                    raise FcxError(f"{top}: more than {MAX_FOLDER_FILES:,} files; not an fcexport artifact folder")
    return found


SUPERSEDED = "superseded"
HISTORY = "history.csv"
RESULTS = ("metrics.json", HISTORY, "curves.png", "confusion.png")  # what fcx train writes about a model
PREVIOUS_HISTORY = ".history.previous.csv"  # the folder's model's history while a new training run writes its own


def set_aside_history(folder: Path) -> None:
    """Before a training run writes history.csv epoch by epoch: the history of the model still in the folder is
    kept aside (hidden), so it goes with that model when the new one replaces it (retire_generation), and a run
    that is killed leaves the old model and its history in place. One kept from an earlier killed run stays."""
    import os

    folder = Path(folder)
    if (folder / MODEL).is_file() and (folder / HISTORY).is_file() and not (folder / PREVIOUS_HISTORY).exists():
        os.replace(folder / HISTORY, folder / PREVIOUS_HISTORY)


def restore_history(folder: Path) -> None:
    """A training run failed before writing its model: the folder's model gets its own history back (set aside by
    set_aside_history) in place of the failed run's; with none set aside, the failed run's stays (its progress)."""
    import os

    folder = Path(folder)
    if (folder / PREVIOUS_HISTORY).is_file():
        os.replace(folder / PREVIOUS_HISTORY, folder / HISTORY)


def retire_generation(folder: Path) -> Path | None:
    """Before a new model.pt replaces the folder's: move the old one, every file made from it (exports, manifest,
    signature) and its training results into superseded/STAMP/, so no stale file answers for the new model and
    the old set stays whole (fcx verify --artifacts that folder still works). None when there is no model.pt."""
    import os
    import time

    folder = Path(folder)
    if not (folder / MODEL).is_file():
        return None
    made = [f for files in registry.artifacts().values() for f in artifact_files(folder, files) if f != MODEL]
    history = folder / PREVIOUS_HISTORY
    results = [r for r in RESULTS if not (r == HISTORY and history.is_file())]  # a training run writes its own
    moving = [n for n in dict.fromkeys([*made, SIGNATURE, MANIFEST, *results, MODEL]) if (folder / n).is_file()]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = folder / SUPERSEDED / stamp
    for n in range(2, 1000):
        if not target.exists():
            break
        target = folder / SUPERSEDED / f"{stamp}-{n}"
    target.mkdir(parents=True)
    if history.is_file():
        os.replace(history, target / HISTORY)
    for name in moving:  # model.pt last: until then, a folder left half-way still holds the model its files came from
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder / name, target / name)
    prune_empty_folders(folder, [f for files in registry.artifacts().values() for f in files])
    return target


def prune_empty_folders(folder: Path, entries) -> None:
    """Remove the sub-folders of `entries`' folders that removing stale files left empty."""
    for entry in (e for e in entries if e.endswith("/") and (Path(folder) / e).is_dir()):
        top = Path(folder) / entry
        for path in sorted((p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)) + [top]:
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty


def record_in_manifest(folder: Path, sources: dict[str, str], versions: dict, created: str, model_sha256: str | None = None,
                       settings: dict[str, dict] | None = None) -> Path:
    """Add or refresh the entries of the files in `sources` (name -> sha256 of the model.pt each was made
    from) with their own sha256 and size; keep the other entries whose files are still there, and
    always describe the current model.pt. `settings` (artifact name -> what the export chose for it) are recorded
    so verify can rebuild those files from them; the record of an artifact whose files are gone goes with them.
    Written last, atomically: it is what readers trust."""
    folder = Path(folder)
    before = read_manifest(folder) or {}
    previous = before.get("files", {})
    files = {}
    for name in dict.fromkeys(f for files in registry.artifacts().values() for f in artifact_files(folder, files)):
        path = folder / name
        if name == MODEL and model_sha256 is not None:  # the hash of the bytes the caller loaded, not a re-read
            files[name] = {"sha256": model_sha256, "bytes": path.stat().st_size}
        elif name == MODEL or name in sources:
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            if name in sources:
                files[name]["source_sha256"] = sources[name]
        elif name in previous:
            files[name] = previous[name]
    present = {a for a, entries in registry.artifacts().items() if any(f in files for f in artifact_files(folder, entries))}
    recorded = {**(before.get("settings") if isinstance(before.get("settings"), dict) else {}), **(settings or {})}
    recorded = {artifact: chosen for artifact, chosen in recorded.items() if artifact in present}
    path = folder / MANIFEST
    write_json_atomic(path, {"created": created, "versions": versions, "files": files} | ({"settings": recorded} if recorded else {}))
    return path


def recorded_settings(manifest: dict, artifact: str) -> dict | None:
    """What the export that wrote `artifact` recorded of its settings in the manifest (record_in_manifest), or None."""
    recorded = manifest.get("settings")
    chosen = recorded.get(artifact) if isinstance(recorded, dict) else None
    return chosen if isinstance(chosen, dict) else None


def manifest_name(folder: Path, path: Path) -> str:
    """The manifest's key for a file: its path relative to the folder (file sets may have sub-folders)."""
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return Path(path).name


def check_against_manifest(path: Path, manifest: dict | None, model_sha256: str | None, data: bytes | None = None,
                           name: str | None = None) -> str | None:
    """Why the artifact at `path` (or `data`, the bytes read from it; `name`: its manifest key, default its file
    name) cannot be trusted, or None: not listed in the manifest, changed since it was written, or made from another
    model.pt than the folder's current one."""
    if manifest is None:
        return f"{name or path.name}: no {MANIFEST} next to it, so where it came from cannot be checked"
    return integrity_problem(path, manifest, data, name) or stale_problem(path, manifest, model_sha256, name)


def listing_problem(path: Path, manifest: dict, name: str | None = None) -> str | None:
    """What the manifest says against a file before it is read: not listed, or another size than it lists."""
    name = name or path.name
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict):
        return f"{name} is not listed in {MANIFEST} (an interrupted export, or copied in from elsewhere)"
    if path.is_file() and entry.get("bytes") != path.stat().st_size:
        return f"{name} changed after it was written (its size differs from {MANIFEST})"
    return None


def integrity_problem(path: Path, manifest: dict, data: bytes | None = None, name: str | None = None) -> str | None:
    """Why the bytes at `path` (or `data`, read from it) are not the ones the manifest lists, or None."""
    name = name or path.name
    if not isinstance(manifest["files"].get(name), dict):
        return listing_problem(path, manifest, name)
    if not _matches_entry(path, manifest["files"][name], data):
        return f"{name} changed after it was written (its sha256 differs from {MANIFEST})"
    return None


def _matches_entry(path: Path, entry, data: bytes | None = None) -> bool:
    """The file at `path` (or the bytes read from it) has the size and sha256 its manifest entry records."""
    if not isinstance(entry, dict):
        return False
    if data is not None:
        return entry.get("bytes") == len(data) and entry.get("sha256") == hashlib.sha256(data).hexdigest()
    return entry.get("bytes") == path.stat().st_size and entry.get("sha256") == sha256_file(path)


def stale_problem(path: Path, manifest: dict, model_sha256: str | None, name: str | None = None) -> str | None:
    """Why a listed artifact may answer for another model.pt than the folder's current one, or None."""
    name = name or path.name
    source = (manifest["files"].get(name) or {}).get("source_sha256")
    if model_sha256 is not None and source is not None and source != model_sha256:
        return f"{name} was made from another model.pt than this one (source sha256 {source[:12]}); it is stale"
    return None


def folder_problems(folder: Path, manifest: dict) -> list[str]:
    """Every file the manifest lists that is missing or differs from its entry (for a digest check, where
    the manifest is all that vouches for the set)."""
    problems = []
    for name, entry in manifest["files"].items():
        path = Path(folder) / str(name)
        if Path(str(name)).is_absolute() or ".." in Path(str(name)).parts or not path.is_file():
            problems.append(f"{name} is listed in {MANIFEST} but not in the folder")
        elif not _matches_entry(path, entry):
            problems.append(f"{name} differs from its entry in {MANIFEST}")
    return problems


def check_digest(folder: Path, expected: str) -> str | None:
    """Why the folder is not the one whose manifest.json has sha256 `expected`, or None."""
    expected = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise FcxError(f"the expected digest must be 64 hex digits (a sha256), got '{expected[:80]}'")
    found = read_manifest_bytes(folder)
    if found is None:
        return f"no {MANIFEST} in {folder}"
    manifest, digest = found
    if digest != expected:
        return f"{MANIFEST} has sha256 {digest[:16]}..., not the expected {expected[:16]}..."
    problems = folder_problems(folder, manifest)
    return "; ".join(problems) if problems else None


# ---- signing (OpenSSF Model Signing, bring-your-own elliptic-curve key) ----------------------------
# The whole folder is signed, every file but the signature itself: a file changed, added or removed
# after signing fails verification. model_signing writes a sigstore bundle (DSSE over in-toto).


def _hashing_config(folder: Path, signature: Path):
    """sha256 of every file in `folder` (git files and symlinks included: a symlink fails), but the signature."""
    from model_signing import hashing

    inside = signature.resolve().is_relative_to(folder.resolve())
    ignored = [signature.resolve().relative_to(folder.resolve())] if inside else []
    return hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=False)


def sign_folder(folder: Path, private_key: Path, signature: Path | None = None) -> Path:
    """Sign every file in `folder` with an elliptic-curve private key (PEM), after checking that the files
    match the manifest; the signature goes to `signature` (default FOLDER/model.sig), written atomically."""
    import tempfile

    from model_signing import signing

    from fcexport.files import write_bytes_atomic

    folder, private_key = Path(folder), Path(private_key)
    signature = Path(signature) if signature is not None else folder / SIGNATURE
    if problem := key_problem(private_key, private=True):
        raise FcxError(problem)
    if (work_tree := git_work_tree(private_key)) is not None:
        import logging

        logging.getLogger("fcexport").warning(
            f"the private key {private_key} is inside the git work tree {work_tree}: one `git add .` publishes it; "
            "keep keys outside any project (the README uses ~/.config/fcx/)")
    manifest = read_manifest(folder)
    problems = folder_problems(folder, manifest) if manifest is not None else [f"there is no {MANIFEST}"]
    if problems:
        raise FcxError(f"{folder}: will not sign a folder that does not match its manifest: {'; '.join(problems)}", hint="export")
    with tempfile.TemporaryDirectory() as scratch:  # outside the folder, so nothing half-written is hashed
        written = Path(scratch) / SIGNATURE
        config = signing.Config().use_elliptic_key_signer(private_key=private_key)
        config.set_hashing_config(_hashing_config(folder, signature)).sign(folder, written)
        write_bytes_atomic(signature, written.read_bytes())
    return signature


def check_signature(folder: Path, public_key: Path, signature: Path | None = None) -> str | None:
    """Why `folder` is not exactly what `public_key`'s owner signed (a file changed, added or removed, or
    the signature is not theirs), or None."""
    from model_signing import verifying

    folder, public_key = Path(folder), Path(public_key)
    signature = Path(signature) if signature is not None else folder / SIGNATURE
    if problem := key_problem(public_key, private=False):
        raise FcxError(problem)
    if not signature.is_file():
        return f"no signature at {signature}: sign the folder with its private key"
    if signature.stat().st_size > MAX_SIGNATURE_BYTES:  # model_signing reads it whole
        return f"{signature}: {signature.stat().st_size:,} bytes is larger than a signature fcexport reads ({MAX_SIGNATURE_BYTES:,})"
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=public_key)
        config.set_hashing_config(_hashing_config(folder, signature)).verify(folder, signature)
    except Exception as exc:  # model_signing raises ValueError and library-specific errors alike
        return f"the signature does not match: {_signature_mismatch(str(exc))}"
    return None


def git_work_tree(path: Path) -> Path | None:
    """The git work tree holding `path` (a folder above it with a .git entry), or None."""
    for folder in Path(path).resolve().parents:
        if (folder / ".git").exists():
            return folder
    return None


def key_problem(path: Path, private: bool) -> str | None:
    """Why `path` is not a PEM elliptic-curve key of the wanted kind, or None (read before model_signing sees it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fcexport.targets import read_bytes

    kind = "private" if private else "public"
    try:
        data = read_bytes(path, MAX_KEY_BYTES)
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except FcxError as exc:  # missing, not a file, or larger than any key
        return f"{exc}; a PEM {kind} key is expected"
    except (ValueError, TypeError) as exc:
        return f"{path}: not a readable PEM {kind} key ({type(exc).__name__}); make one with openssl (see the README)"
    wanted = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if not isinstance(key, wanted):
        return f"{path}: a {type(key).__name__.removeprefix('_')}, but signing uses an elliptic-curve key (openssl ecparam -name prime256v1)"
    return None


def _signature_mismatch(message: str) -> str:
    """model_signing's diff in a line: which files changed, appeared or went missing."""
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", message)  # quotes escaped when repr() chose '...'
    parts = [f"{', '.join(changed)} changed since signing"] if changed else []
    parts += [m.strip() for m in re.findall(r"((?:Extra|Missing) files found in model '[^']*': [^\"\]]+|Missing files in model '[^']*': [^\"\]]+)", message)]
    return "; ".join(parts) if parts else message.splitlines()[0][:300] if message else "verification failed"


def versions() -> dict:
    """The versions that shape what an export writes (recorded in every manifest and artifact)."""
    import onnx
    import onnxruntime
    import torch

    return {"torch": str(torch.__version__), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
