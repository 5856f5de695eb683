"""Atomic file writes and hashing: a crash never leaves a half-written artifact that looks valid."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

from fcexport.errors import FcxError


def default_mode() -> int:
    """The usual mode of a new file, 0666 & ~umask (mkstemp would leave 0600). os.umask can only be read
    by setting it, so it is set back at once."""
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space",
    errno.EDQUOT: "the disk quota is used up; free some space",
    errno.EROFS: "the folder is read-only; choose another one",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EISDIR: "a folder has that name; choose another path",
    errno.ENOTDIR: "a file is in the way of the folder; choose another path",
    errno.EEXIST: "a file is in the way of the folder; choose another path",
}


def write_error(path: str | os.PathLike, exc: OSError) -> FcxError:
    """One clear line for an OSError while writing `path`."""
    advice = _ADVICE.get(exc.errno, "check the path and the disk")
    return FcxError(f"{path}: cannot write ({exc.strerror or exc}); {advice}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced, given the usual mode and
    renamed onto `path`.

    The temp file lives in the same folder so the final `os.replace` is an atomic rename.
    On any exception (including KeyboardInterrupt) the temp file is removed and `path` is untouched;
    an OSError (disk full, read-only folder, ...) becomes one FcxError line.
    The temp name carries our PID, so temp files left by a killed writer are removed on the next write.
    """
    path = Path(path)
    tmp = None
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        remove_orphaned_temp_files(path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def check_writable_folder(folder: str | os.PathLike) -> None:
    """Create `folder` if needed and make sure files can be written into it; one FcxError line if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_error(folder, exc) from exc


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """All of `data` or nothing at `path`. Serialisers write to memory first and call this, so a full
    disk is a Python OSError we report, never an abort inside a C++ writer."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _write_all(f, data)


def _write_all(f, data: bytes) -> None:
    f.write(data)
    f.flush()


@contextlib.contextmanager
def staging_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A private folder inside `folder` to write a set of files into; `publish` then moves them in.

    Writing is what takes time (and what a kill or a full disk interrupts), so the previous set stays
    whole until the moment of publishing. Removed afterwards in every case; one left by a killed
    writer is removed by the next one.
    """
    folder = Path(folder)
    stage = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".staging.*"):
            pid = leftover.name.split(".")[2]
            if pid.isdigit() and not process_exists(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".staging.{os.getpid()}.", dir=folder))
        yield stage
    except OSError as exc:
        raise write_error(folder, exc) from exc
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, folder: Path) -> list[Path]:
    """Move every file of `stage` (sub-folders included) to the same place under `folder` (renames on one file
    system: milliseconds). Hidden names (temp files) stay behind."""
    moved = []
    for staged in sorted(p for p in stage.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = staged.relative_to(stage)
        if any(part.startswith(".") for part in relative.parts):
            continue
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        remove_orphaned_temp_files(target)
        moved.append(target)
    return moved


def remove_orphaned_temp_files(path: Path) -> None:
    """Delete `.<name>.<pid>.*.tmp` next to `path` whose writer process no longer exists (killed mid-write)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = leftover.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not process_exists(int(pid)):
            with contextlib.suppress(OSError):
                leftover.unlink()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks existence only
    except (ProcessLookupError, OverflowError, ValueError):  # a PID too large to exist is not running
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


ZIP_RECORD_OVERHEAD = 256  # bytes a zip spends per record besides its data and twice its name (headers, alignment)
ZIP_TAIL_BYTES = (1 << 16) + 1024  # the end records and the longest comment a zip can carry
MAX_DIRECTORY_ENTRY_BYTES = 512  # a central-directory entry with a name of the length torch writes, with room
LEGACY_TORCH_SAVE = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # its first pickle: torch's magic number


def zip_directory(source: bytes | Path, path, max_records: int) -> list:
    """The records of the zip archive `source` (its bytes, or the path of the file: then only its end record and
    central directory are read, never its records), refused unless the directory is of a size `max_records` can
    have, names are unique and the records account for the file: data, headers and names, nothing more. A file
    that is mostly bytes no record declares (a sparse 4 GB file with a small zip at its end) is refused before
    anything reads it."""
    import io
    import zipfile

    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    try:
        with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as f:
            # zipfile reads the whole central directory its end record declares; _EndRecData reads the end record
            # alone (no public API does), so the directory's size and count are checked before it is read
            end = zipfile._EndRecData(f)
            if end is None:
                raise zipfile.BadZipFile("no end of central directory")
            count, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
            if count > max_records or directory > max_records * MAX_DIRECTORY_ENTRY_BYTES:
                raise FcxError(f"{path}: {count:,} records in a {directory:,}-byte directory is more than a model file holds")
            records = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as exc:  # struct: an entry cut short
        if _head(source).startswith(LEGACY_TORCH_SAVE):
            raise FcxError(f"{path}: saved in torch.save's format from before torch 1.6, which fcexport does not read; "
                           "load it with torch.load and save it again with torch.save (a zip archive)") from exc
        raise FcxError(f"{path}: corrupt or truncated file (not a torch zip archive); copy or save it again") from exc
    except OSError as exc:
        raise FcxError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(records) > max_records:
        raise FcxError(f"{path}: {len(records):,} records is more than a model file holds")
    if len({r.filename for r in records}) != len(records):
        raise FcxError(f"{path}: two records have the same name (which one a reader takes is up to it): refused")
    stored = sum(r.compress_size for r in records)
    accounted = stored + sum(2 * len(r.filename.encode()) + ZIP_RECORD_OVERHEAD for r in records) + ZIP_TAIL_BYTES
    if size > accounted:
        raise FcxError(f"{path}: {size - stored:,} of its {size:,} bytes belong to no record its zip directory lists: refused")
    return records


def _head(source: bytes | Path) -> bytes:
    if isinstance(source, bytes):
        return source[:len(LEGACY_TORCH_SAVE)]
    with open(source, "rb") as f:
        return f.read(len(LEGACY_TORCH_SAVE))


def stored_zip_records(data: bytes, path, max_records: int, deflated: bool = False) -> list:
    """The records of the zip archive `data` (read from `path`; zip_directory's checks first), refused unless each is
    stored as it is (torch.save never compresses; with `deflated`, zlib's deflate is allowed too: torch.jit.save
    deflates its code) and the declared sizes add up to no more than the file (with `deflated`, twice the file and
    16 MiB): a record could otherwise inflate far beyond the file's size before anything is checked. Read records
    with `read_record`, which never unpacks more than a record declares."""
    import zipfile

    records = zip_directory(data, path, max_records)
    for record in records:
        plain = record.compress_type == zipfile.ZIP_STORED and record.file_size == record.compress_size
        if not (plain or (deflated and record.compress_type == zipfile.ZIP_DEFLATED)):
            raise FcxError(f"{path}: record '{record.filename[:80]}' is compressed in a way torch never writes, "
                           "so the file was not written by torch (or was altered): refused")
    total, allowed = sum(r.file_size for r in records), (2 * len(data) + (16 << 20)) if deflated else len(data)
    if total > allowed:
        raise FcxError(f"{path}: its records claim {total:,} bytes but the file has {len(data):,}")
    return records


def read_record(archive, record, path) -> bytes:
    """One record of a zipfile.ZipFile, never unpacking more than it declares (zlib inflates chunk by chunk)."""
    with archive.open(record) as f:
        body = f.read(record.file_size + 1)
    if len(body) != record.file_size:
        raise FcxError(f"{path}: record '{record.filename[:80]}' unpacks to more or less than it declares: refused")
    return body
