"""model.pt: a Program (fcexport.program) and its spec, stored as JSON text beside plain tensors.

The file is a torch.save zip holding {format, format_version, spec (JSON text), program (JSON text),
tensors (name -> tensor)}. It is read once into memory and hashed; every zip record is checked
(stored, not compressed; sizes that add up) before `torch.load(weights_only=True)` unpickles it, every
tensor is checked against what the program declares, and the program is run on the meta device to
bound every intermediate, so a model.pt from anywhere can describe a network but never run code or
make us allocate what it declares.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import io
import json
import pickle
import re
import signal
import threading
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import fcexport
from fcexport import program as programs
from fcexport.errors import FcxError
from fcexport.files import read_record, stored_zip_records, write_bytes_atomic, zip_directory
from fcexport.program import Program, Shapes
from fcexport.spec import ModelSpec
from fcexport.targets import read_bytes

FORMAT = "fcexport.checkpoint"
FORMAT_VERSION = 3
MAX_FILE_BYTES = 4 << 30  # a 60M-parameter float32 model is 240 MB
MAX_RECORDS = 100_000
MAX_PICKLE_BYTES = 32 << 20  # the pickle holds two JSON texts and the tensor table, not the tensors' bytes


@dataclass(frozen=True)
class StoredModel:
    """A checked model.pt: its program, spec, the sha256 of the bytes that were loaded, and its shapes."""

    program: Program
    spec: ModelSpec
    sha256: str
    shapes: Shapes


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def save_program(program: Program, spec: ModelSpec, path: str | Path) -> str:
    """Write the program with its spec atomically; returns the sha256 of the bytes written."""
    made = spec.provenance
    versions = {"torch": str(torch.__version__), "fcexport": fcexport.__version__, **made.versions}
    spec = replace(spec, provenance=replace(made, created=made.created or now_iso(), versions=versions))
    checkpoint = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": json.dumps(spec.to_dict()),
        "program": json.dumps(programs.to_data(program)),
        "tensors": {k: v.detach().cpu().contiguous().clone() for k, v in program.tensors.items()},
    }
    buffer = io.BytesIO()  # serialised in memory: a full disk is then a Python OSError, never a C++ abort
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_model(path: str | Path, data: bytes | None = None) -> StoredModel:
    """Read model.pt once (or take the bytes the caller read and checked), hash those bytes, check and load them;
    every way it can be wrong is one FcxError."""
    path = Path(path)
    data = read_file(path) if data is None else data
    where = str(path)
    checkpoint = _unpickle(data, path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise FcxError(f"{path}: not an fcexport model (a bare state dict or another tool's file?)", hint="import")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise FcxError(f"{path}: written by another version of fcexport (format {checkpoint.get('format_version')!r}, "
                       f"this one reads {FORMAT_VERSION}); import or train the model again", hint="train-or-import")
    spec = ModelSpec.from_dict(_json(checkpoint.get("spec"), "spec", where), where)
    program = programs.from_data(_json(checkpoint.get("program"), "program", where), checkpoint.get("tensors"), where)
    shapes = programs.check_shapes(program, spec.input_shape, where)
    out = programs.output_shape(program, shapes, where)
    if out != spec.output_shape:
        raise FcxError(f"{path}: the model returns {list(out)} logits per image but its spec says {list(spec.output_shape)} "
                       f"({len(spec.class_names)} classes)")
    if programs.other_outputs(program, shapes, where) != spec.other_outputs:
        raise FcxError(f"{path}: the program's other outputs differ from those its spec lists "
                       f"({', '.join(name for name, _ in spec.other_outputs) or 'none'})")
    if programs.returns_probabilities(program, out) != spec.probabilities:
        raise FcxError(f"{path}: its spec says the model returns {'probabilities' if spec.probabilities else 'logits'}, "
                       "which the program's last op contradicts; import the model again")
    # what one image keeps alive is the program's, never a smaller claim (a larger one, a fused model's, only halves batches)
    spec = replace(spec, peak_bytes=max(spec.peak_bytes, shapes.peak))
    return StoredModel(program, spec, hashlib.sha256(data).hexdigest(), shapes)


def load_model(path: str | Path):
    """(eval-mode nn.Module that runs the stored program, ModelSpec): the model.pt as a live model."""
    stored = read_model(path)
    return programs.ProgramModule(stored.program).eval(), stored.spec


def read_file(path: Path) -> bytes:
    """The whole file, once, after its size and its zip directory (files.zip_directory: the records must account for
    the file) are checked without reading its records; missing, empty and oversized files are named."""
    _check_size(path)
    zip_directory(path, path, MAX_RECORDS)
    return read_bytes(path, MAX_FILE_BYTES)


def _check_size(path: Path) -> None:
    if not path.is_file():
        raise FcxError(f"{path}: file not found", hint="train-or-import")
    size = path.stat().st_size
    if size == 0:
        raise FcxError(f"{path}: file is empty")
    if size > MAX_FILE_BYTES:
        raise FcxError(f"{path}: {size:,} bytes is larger than fcexport reads ({MAX_FILE_BYTES:,})")


def _read_sized(path: Path) -> bytes:
    _check_size(path)
    return read_bytes(path, MAX_FILE_BYTES)


SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_SAFETENSORS_HEADER = 16 << 20  # ~100 bytes a tensor: room for 100,000 (the library's own limit is 100 MB)
MAX_SAFETENSORS_ENTRIES = 100_000  # tensors and metadata strings


def load_safetensors(data: bytes, path: Path) -> dict:
    """The tensors of a .safetensors file's bytes, after its header is checked: a JSON table whose every tensor has
    a known dtype, a shape whose size matches its byte range, and ranges that lie inside the file without
    overlapping (so nothing larger than the file is ever allocated)."""
    import math

    def bad(why: str) -> FcxError:
        return FcxError(f"{path}: not a readable safetensors file ({why}); save it again with safetensors", hint="import")

    if len(data) < 8:
        raise bad("truncated before its header")
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_SAFETENSORS_HEADER, len(data) - 8):
        raise bad(f"its header says {size:,} bytes, the file holds {len(data) - 8:,} after the length")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError) as exc:
        raise bad(f"its header is not JSON: {type(exc).__name__}") from exc
    if not isinstance(header, dict):
        raise bad("its header is not a table")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and len(header) + len(metadata) <= MAX_SAFETENSORS_ENTRIES):
        raise bad(f"its header must be a table of at most {MAX_SAFETENSORS_ENTRIES:,} tensors and metadata strings")
    body, ranges = len(data) - 8 - size, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES and isinstance(entry.get("shape"), list)
                and len(entry["shape"]) <= 8 and all(type(v) is int and v >= 0 for v in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(type(v) is int for v in entry["data_offsets"])):
            raise bad(f"tensor {str(name)[:80]!r} has no valid dtype, shape and offsets")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= body:
            raise bad(f"tensor {str(name)[:80]!r} lies outside the file (bytes {begin:,}-{end:,} of {body:,})")
        if end - begin != math.prod(entry["shape"]) * SAFETENSORS_DTYPES[entry["dtype"]]:
            raise bad(f"tensor {str(name)[:80]!r}: shape {entry['shape']} does not fill bytes {begin:,}-{end:,}")
        ranges.append((begin, end))
    ranges.sort()
    if any(later[0] < earlier[1] for earlier, later in zip(ranges, ranges[1:])):
        raise bad("two tensors share bytes")
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # its own SafetensorError for what the checks above do not cover
        raise bad(f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def check_archive(data: bytes, path: Path) -> None:
    """A torch.save zip whose records are stored as they are (files.stored_zip_records), with pickles of bounded
    size whose dict keys cannot be made to collide (check_keys), checked before anything is read from it."""
    records = stored_zip_records(data, path, MAX_RECORDS)
    pickles = [r for r in records if r.filename.lower().endswith(".pkl")]  # in any case, as torch finds them
    for record in pickles:
        if record.file_size > MAX_PICKLE_BYTES:
            raise FcxError(f"{path}: its pickle is {record.file_size:,} bytes (at most {MAX_PICKLE_BYTES:,})")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for record in pickles:
            check_keys(read_record(archive, record, path), path)


# What check_keys tracks of each value a pickle makes: an atom's kind, or a container (_Node) of the values it holds
PLAIN, CRAFTED, COLLIDING = 0, 1, 2  # COLLIDING: an integer beyond the hash modulus (distinct ones can hash alike);
# CRAFTED: an integer beyond 32 bits or a float, whose hash the file picks freely: a tuple holding one can be made to
# collide with others (a tuple of small integers cannot, short of an enormous search)
_INTEGERS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
HASH_MODULUS = (1 << 61) - 1  # Python's integers below it hash to themselves: distinct ones never collide
MAX_CHOSEN_KEYS = 10_000  # insertions of values of a chosen hash: 10,000 that all collide cost a second, not hours
ALLOCATING_CALLS = {"builtins bytearray", "__builtin__ bytearray"}  # bytearray(2**34): gigabytes from 14 bytes


class _Node:
    """A container on check_keys' stack (a tuple, list, dict or set, or an object a call or BUILD made, holding its
    arguments), shared through the memo: what is added to it later is in it."""

    def __init__(self, kind: str, held: list):
        self.kind, self.held = kind, held


def _atom(opcode, arg) -> int:
    if opcode.name in ("FLOAT", "BINFLOAT"):
        return CRAFTED
    if opcode.name in _INTEGERS and type(arg) is int:
        return COLLIDING if abs(arg) >= HASH_MODULUS else CRAFTED if abs(arg) >= 1 << 31 else PLAIN
    return PLAIN


def _weight(value, seen: dict) -> tuple[int, bool]:
    """(how many values of a chosen hash `value` holds, counting repeats: what inserting it, or the pairs or items it
    is made of, could put into one table; whether its own hash is the file's choice)."""
    if not isinstance(value, _Node):
        return (1 if value == COLLIDING else 0), value in (CRAFTED, COLLIDING)
    if id(value) in seen:
        return seen[id(value)]
    seen[id(value)] = (0, False)  # a container that holds itself
    total, crafted = 0, False
    for item in value.held:
        count, chosen = _weight(item, seen)
        total, crafted = total + count, crafted or chosen
    hashable = value.kind in ("tuple", "object")  # a tuple (or torch.Size) hashes from its items
    found = (total + (1 if hashable and crafted else 0), hashable and crafted)
    seen[id(value)] = found
    return found


def check_keys(data: bytes, path: Path) -> None:
    """Refuse a pickle that would insert more than MAX_CHOSEN_KEYS values of a chosen hash into dicts and sets:
    integers equal modulo 2**61 - 1, or tuples of chosen integers and floats, can all land in one slot, and inserting
    N of them costs N**2 (100,000 in a 1.3 MB file: minutes), most of it in one call no signal interrupts. Counted
    wherever keys can go in: the keys of SETITEM(S), DICT, ADDITEMS, FROZENSET; everything a call (REDUCE, NEWOBJ)
    or BUILD is given (OrderedDict(pairs), dict.update(state)), repeats and lists filled later included. The opcodes
    are walked once; nothing is built."""
    import pickletools

    stack: list = []
    marks: list[int] = []
    memo: dict = {}
    chosen = 0

    def weigh(values) -> int:
        seen: dict = {}
        return sum(_weight(v, seen)[0] for v in values)

    try:
        for opcode, arg, _ in pickletools.genops(data):
            name, before = opcode.name, opcode.stack_before
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else PLAIN
                continue
            items: list = []
            if pickletools.markobject in before:  # everything down to the mark, then the fixed items below it
                at = marks.pop()
                items, stack[at:] = stack[at:], []
                before = before[:before.index(pickletools.markobject)]
            if len(before) > len(stack):
                raise ValueError("stack underflow")
            popped = stack[len(stack) - len(before):] if before else []
            del stack[len(stack) - len(before):]
            target = popped[0] if popped and isinstance(popped[0], _Node) else None
            if name in ("SETITEM", "SETITEMS", "ADDITEMS"):  # into the dict or set below
                added = popped[1:] + items
                chosen += weigh(added if name == "ADDITEMS" else added[0::2])
                if target:
                    target.held += added
                stack.append(popped[0])
            elif name in ("APPEND", "APPENDS", "BUILD"):  # the list or object below, with more in it
                chosen += weigh(popped[1:]) if name == "BUILD" else 0
                if target:
                    target.held += popped[1:] + items
                stack.append(popped[0])
            elif name in ("DICT", "FROZENSET"):
                chosen += weigh(items[0::2] if name == "DICT" else items)
                stack.append(_Node("dict" if name == "DICT" else "tuple", items))
            elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
                if popped[0] in ALLOCATING_CALLS:
                    raise FcxError(f"{path}: refused: its pickle calls {popped[0].split()[-1]}, which allocates what the "
                                   "file merely declares; no checkpoint needs it")
                chosen += weigh(popped[1:])
                stack.append(_Node("object", popped[1:]))
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, PLAIN))
            elif name == "GLOBAL":  # "module name", to know the calls it makes
                stack.append(str(arg))
            elif name == "DUP":
                stack += popped * 2
            elif name in ("EMPTY_LIST", "LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append(_Node("list" if "LIST" in name else "dict", items))
            elif name.startswith("TUPLE") or name == "EMPTY_TUPLE":
                stack.append(_Node("tuple", popped + items))
            else:
                stack += [_atom(opcode, arg)] * len(opcode.stack_after)
            if chosen > MAX_CHOSEN_KEYS:
                raise FcxError(f"{path}: refused: its pickle would insert more than {MAX_CHOSEN_KEYS:,} keys of a hash it "
                               "chooses (integers beyond 2**61, tuples of large integers or floats) into its dicts and "
                               "sets; built, they could collide and take hours, and no checkpoint needs them")
    except FcxError:
        raise
    except Exception as exc:  # genops refuses what no unpickler could read
        raise FcxError(f"{path}: corrupt or truncated file (its pickle: {type(exc).__name__})") from exc


def is_torchscript(data: bytes) -> bool:
    """TorchScript archives are zips with code/ and constants.pkl next to data.pkl."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_weights_file(path: Path) -> tuple[object, str]:
    """A user's weights file, read once: (its state dict, the sha256 of its bytes). A .safetensors file is read by
    the safetensors library (which never unpickles) after its header is checked; anything else is torch.save's zip,
    loaded with torch.load(weights_only=True). TorchScript, torch.export programs and pickled whole models are
    refused by name with the way in."""
    if path.suffix.lower() == ".safetensors":
        data = _read_sized(path)
        return load_safetensors(data, path), hashlib.sha256(data).hexdigest()
    data = read_file(path)
    if path.suffix.lower() == ".pt2":
        raise FcxError(f"{path}: a torch.export program is compiled code, not weights; save model.state_dict() "
                       "with torch.save and import it with the model's code", hint="import")
    return _unpickle(data, path, TRAINING_SCRIPT_GLOBALS), hashlib.sha256(data).hexdigest()


# Plain-data classes training scripts save beside the weights (timm's train.py: its arguments as an argparse.Namespace):
# unpickled as attribute bags, never called with code of the file's choosing
TRAINING_SCRIPT_GLOBALS = (argparse.Namespace,)


UNPICKLE_CPU_SECONDS = 15  # a pickle can repeat work (re-insert one mapping thousands of times): at most this much


class _OverBudget(Exception):
    pass


@contextlib.contextmanager
def _cpu_budget(seconds: float):
    """Stop the block with _OverBudget once the process has spent `seconds` more of CPU time in it (SIGPROF); the
    state says whether it fired (torch re-raises what its unpickler meets as its own error). Signals reach the main
    thread only: elsewhere the block runs unbounded."""
    state = {"fired": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def stop(signum, frame):
        state["fired"] = True
        raise _OverBudget

    previous = signal.signal(signal.SIGPROF, stop)
    outer = signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
        if outer[0] > 0:  # a profiler's own timer, going on
            signal.setitimer(signal.ITIMER_PROF, *outer)


def _unpickle(data: bytes, path: Path, allowed: tuple = ()):
    """torch.load(weights_only=True) of checked bytes, with `allowed` plain-data classes besides tensors and containers,
    in at most UNPICKLE_CPU_SECONDS of CPU time."""
    if is_torchscript(data):
        raise FcxError(f"{path}: a TorchScript file is code, not weights, and is not loaded; save model.state_dict() "
                       "with torch.save and import it with the model's code", hint="import")
    with _cpu_budget(UNPICKLE_CPU_SECONDS) as budget:
        try:
            check_archive(data, path)
            return _loaded(data, path, allowed)
        except Exception as exc:
            if budget["fired"]:
                raise FcxError(f"{path}: refused: unpickling it took more than {UNPICKLE_CPU_SECONDS} s of CPU time (a "
                               "pickle that repeats work, or collides its keys, without end)") from exc
            raise


def _loaded(data: bytes, path: Path, allowed: tuple):
    try:
        with warnings.catch_warnings():  # torch warns about sparse tensors it validates; fcexport refuses them after
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(allowed)):
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except _OverBudget:
        raise
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled {named.group(1)[:80]}" if named else "pickled Python objects"
        raise FcxError(
            f"{path}: refused: it holds {what} (a whole model saved with torch.save(model)?), which could run code "
            "when loaded; save model.state_dict() instead and import it with the model's code", hint="import"
        ) from exc
    except Exception as exc:  # zip/EOF/runtime errors all mean a damaged file
        raise FcxError(f"{path}: corrupt or truncated file ({type(exc).__name__}); copy or save it again") from exc


def _json(text, field: str, where: str):
    if not isinstance(text, str):
        raise FcxError(f"{where}: its {field} must be JSON text")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FcxError(f"{where}: its {field} is not valid JSON ({type(exc).__name__})") from exc
