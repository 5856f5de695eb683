"""Hostile and broken inputs, each in a real `fcx` process under a memory limit and a CPU-time limit:
exit 2, one line, no traceback, nothing allocated from what the file merely declares."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import bounded, out_of_cpu, save_png
from onnx import TensorProto, helper

MEMORY_LIMIT = 6 << 30  # bytes of address space: a CUDA build of torch maps ~4 GB just to load; the rest is 1.5 GB
CPU_LIMIT = 30  # seconds of CPU time per command (RLIMIT_CPU): a busy machine slows a command, never fails it
ROOT = Path(__file__).parents[1]


PEAK_RSS_LIMIT = 1536 << 20  # bytes actually used by one command, imports included
# Runs `fcx ARGS` and, as it exits, writes its peak resident memory (KiB) to the file named first.
LAUNCHER = """
import atexit, resource, runpy, sys
peak_file = sys.argv[1]
sys.argv = ["fcx", *sys.argv[2:]]
atexit.register(lambda: open(peak_file, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
runpy.run_module("cli.main", run_name="__main__")
"""


def run_limited(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`fcx ARGS` in a real process under RLIMIT_AS and RLIMIT_CPU; fails the test if it used over 1.5 GB or
    CPU_LIMIT seconds of CPU time."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        result = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak_file), *map(str, args)], capture_output=True,
                                text=True, preexec_fn=bounded(CPU_LIMIT, MEMORY_LIMIT), env=env, cwd=cwd)
        peak = int(peak_file.read_text()) * 1024 if peak_file.is_file() else 0
    assert not out_of_cpu(result.returncode), f"fcx {' '.join(map(str, args))}: over {CPU_LIMIT} s of CPU time"
    assert peak < PEAK_RSS_LIMIT, f"fcx {' '.join(map(str, args))}: peak memory {peak >> 20} MiB"
    return result


def fcx_metadata(model: onnx.ModelProto, **fields) -> onnx.ModelProto:
    spec = {"input_shape": [1, 8, 8], "class_names": [str(i) for i in range(10)], "preprocess": {"mode": "object", "object_fill": 1.0}}
    spec.update(fields)
    for key, value in spec.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    return model


def loop_model(folder: Path) -> Path:
    """pixels -> Loop(10**15 iterations of Identity) -> logits: hangs any runtime that runs it."""
    body = helper.make_graph([helper.make_node("Identity", ["v"], ["v_out"]), helper.make_node("Identity", ["cond"], ["cond_out"])],
                             "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                      helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                      helper.make_tensor_value_info("v", TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Constant", [], ["n"], value=helper.make_tensor("n", TensorProto.INT64, [], [10**15])),
             helper.make_node("Constant", [], ["t"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])),
             helper.make_node("Reshape", ["pixels", "shape"], ["flat"]),
             helper.make_node("Loop", ["n", "t", "flat"], ["looped"], body=body),
             helper.make_node("Slice", ["looped", "start", "end", "axis"], ["logits"])]
    inits = [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64]), helper.make_tensor("start", TensorProto.INT64, [1], [0]),
             helper.make_tensor("end", TensorProto.INT64, [1], [10]), helper.make_tensor("axis", TensorProto.INT64, [1], [1])]
    return save_onnx(folder / "loop.onnx", nodes, inits)


def constant_of_shape_model(folder: Path) -> Path:
    """A 4 GB tensor from a 100-byte file."""
    nodes = [helper.make_node("ConstantOfShape", ["big_shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceMean", ["big"], ["m"], keepdims=0),
             helper.make_node("Reshape", ["pixels", "shape"], ["flat"]),
             helper.make_node("Slice", ["flat", "start", "end", "axis"], ["cut"]),
             helper.make_node("Add", ["cut", "m"], ["logits"])]
    inits = [helper.make_tensor("big_shape", TensorProto.INT64, [1], [10**9]), helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64]),
             helper.make_tensor("start", TensorProto.INT64, [1], [0]), helper.make_tensor("end", TensorProto.INT64, [1], [10]),
             helper.make_tensor("axis", TensorProto.INT64, [1], [1])]
    return save_onnx(folder / "constant.onnx", nodes, inits)


def save_onnx(path: Path, nodes, inits) -> Path:
    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(fcx_metadata(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])), str(path))
    return path


def with_onnx_metadata(folder: Path, path: Path, **fields) -> Path:
    """A copy of folder/model.onnx at `path` (outside the folder: no manifest there) with changed metadata."""
    model = onnx.load(str(folder / "model.onnx"))
    props = {p.key: p for p in model.metadata_props}
    for key, value in fields.items():
        props[key].value = json.dumps(value)
    onnx.save(model, str(path))
    return path


def with_checkpoint(folder: Path, name: str, change) -> Path:
    """A copy of model.pt whose parts (spec and program as parsed JSON, tensors) went through `change`."""
    raw = torch.load(folder / "model.pt", weights_only=True)
    parts = {"spec": json.loads(raw["spec"]), "program": json.loads(raw["program"]), "tensors": raw["tensors"]}
    change(parts)
    raw.update(spec=json.dumps(parts["spec"]), program=json.dumps(parts["program"]), tensors=parts["tensors"])
    path = folder / name
    torch.save(raw, path)
    return path


def node(parts: dict, op: str) -> dict:
    """The first node of the stored program that calls `op`."""
    return next(n for n in parts["program"]["nodes"] if n["op"] == op)


def widen(parts: dict, name: str, rows: int) -> None:
    """Declare (and store, as a stride-0 view of one row) a weight of `rows` rows: a huge tensor in a few bytes."""
    tensor = parts["tensors"][name]
    parts["tensors"][name] = tensor[:1].expand(rows, *tensor.shape[1:])
    parts["program"]["tensors"][name]["shape"] = [rows, *tensor.shape[1:]]


def zip_bomb(folder: Path) -> Path:
    """model.pt re-zipped with its records deflated: a small file that inflates far beyond its size."""
    import zipfile

    source, path = folder / "model.pt", folder / "bomb.pt"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
        dst.writestr(src.namelist()[0].split("/")[0] + "/data/padding", b"\0" * (200 << 20))
    return path


def hash_flood(folder: Path, route: str = "setitems", keys: int = 100_000) -> Path:
    """A torch.save zip whose pickle builds a mapping keyed by multiples of 2**61 - 1: every key hashes alike, so each
    insertion walks the earlier ones (100,000 keys in 1.3 MB: minutes of CPU once unpickled). The keys go in by
    `route`: SETITEMS; a call, OrderedDict([(key, None), ...]); the same with the argument tuple made before the list
    is filled (through the memo); BUILD of a list of pairs; torch's _rebuild_from_type_v2 given pairs as lists; or
    `repeat`: a dict of 20,000 small integer keys (they never collide) put into one OrderedDict `keys` times by BUILD
    (work repeated: bounded by CPU time). `bytearray`: no keys, a call that allocates 16 GiB."""
    modulus = (1 << 61) - 1

    def long1(value: int) -> bytes:  # the LONG1 opcode: a little-endian integer of a given byte count
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw

    ordered_dict = b"ccollections\nOrderedDict\n"
    count = 20_000 if route == "repeat" else keys

    def pairs() -> bytes:  # (key, None) each, TUPLE2
        return b"".join(long1(i * modulus) + b"N\x86" for i in range(count))

    flood = b"\x80\x02" + {
        "setitems": lambda: b"}(" + b"".join(long1(i * modulus) + b"N" for i in range(count)) + b"u.",  # .. SETITEMS
        "call": lambda: ordered_dict + b"](" + pairs() + b"e\x85R.",  # GLOBAL, EMPTY_LIST MARK .. APPENDS, TUPLE1, REDUCE
        # OrderedDict and (L,) memoised while L is empty, L filled through its memo, then the call from the memo
        "alias": lambda: ordered_dict + b"q\x00]q\x01\x85q\x02h\x01(" + pairs() + b"eh\x00h\x02R.",
        "build": lambda: ordered_dict + b")R](" + pairs() + b"eb.",  # OrderedDict(), then BUILD with the pairs
        # torch's _rebuild_from_type_v2(OrderedDict, Tensor, ([[key, None], ...],), None): pairs as lists, two deep
        "rebuild": lambda: b"ctorch._tensor\n_rebuild_from_type_v2\n(" + ordered_dict + b"ctorch\nTensor\n]("
                           + b"".join(b"](" + long1(i * modulus) + b"Ne" for i in range(count)) + b"e\x85Nt" + b"R.",
        "bytearray": lambda: b"c__builtin__\nbytearray\n" + long1(1 << 34) + b"\x85R.",  # 16 GiB of zeros
        "repeat": lambda: b"}q\x00(" + b"".join(b"M" + i.to_bytes(2, "little") + b"N" for i in range(count)) + b"u"  # BININT2
                          + ordered_dict + b")R" + b"h\x00b" * keys + b".",
    }[route]()
    path = folder / "flood.pt"
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", flood, len(flood))
    writer.write_record("byteorder", b"little", 6)
    writer.write_end_of_file()
    return path


def legacy_save(folder: Path) -> Path:
    """A state dict in torch.save's format from before torch 1.6 (no zip)."""
    path = folder / "old.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    return path


def csv_file(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


ROW = ",".join(["0"] * 16)
CASES = [
    ("onnx Loop of 1e15 iterations", lambda a, s: ["predict", a / "x.png", "--model", loop_model(s)], "op Loop is not on fcexport's allow-list"),
    ("onnx ConstantOfShape of 4 GB", lambda a, s: ["predict", a / "x.png", "--model", constant_of_shape_model(s)], "(ConstantOfShape) makes 1,000,000,000 values for one image"),
    ("onnx input_shape 1x9999x9999", lambda a, s: ["predict", a / "x.png", "--model", with_onnx_metadata(a, s / "big.onnx", input_shape=[1, 9999, 9999])], "larger than fcexport supports"),
    ("onnx short class_names", lambda a, s: ["predict", a / "x.png", "--model", with_onnx_metadata(a, s / "short.onnx", class_names=["a", "b"])], "spec names 2 classes"),
    ("onnx empty class_names", lambda a, s: ["predict", a / "x.png", "--model", with_onnx_metadata(a, s / "empty.onnx", class_names=[])], "class_names must be a non-empty list"),
    ("onnx class_names not a list", lambda a, s: ["predict", a / "x.png", "--model", with_onnx_metadata(a, s / "str.onnx", class_names="abc")], "class_names must be a non-empty list"),
    ("onnx 2-D input_shape", lambda a, s: ["predict", a / "x.png", "--model", with_onnx_metadata(a, s / "2d.onnx", input_shape=[8, 8])], "input_shape must be [C, H, W]"),
    ("onnx negative input_shape", lambda a, s: ["predict", a / "x.png", "--model", with_onnx_metadata(a, s / "neg.onnx", input_shape=[1, -8, 8])], "input_shape must be [C, H, W]"),
    ("onnx metadata disagrees with the graph", lambda a, s: ["predict", a / "x.png", "--model", with_onnx_metadata(a, s / "lie.onnx", input_shape=[1, 9, 9])], "the model's input is [1, 8, 8] but its metadata says [1, 9, 9]"),
    ("checkpoint declares 10**7 hidden units (stride-0 weight)", lambda a, s: ["export", with_checkpoint(a, "wide.pt", lambda p: widen(p, "fc1.weight", 10**7)), "--artifacts", s],
     "does not match its 8,192 stored bytes"),
    ("checkpoint declares 10**9 hidden units", lambda a, s: ["fuse-bn", with_checkpoint(a, "wider.pt", lambda p: p["program"]["tensors"]["fc1.weight"].update(shape=[10**9, 64])), "--out", s / "f.pt"],
     "tensor 'fc1.weight' is float32 [32, 64] but the program declares"),
    ("checkpoint object_fill 5000", lambda a, s: ["predict", a / "x.png", "--model", with_checkpoint(a, "fill.pt", lambda p: p["spec"]["preprocess"].update(object_fill=5000))], "object_fill must be in [0.1, 1]"),
    ("checkpoint resize of 10**9 pixels", lambda a, s: ["predict", a / "x.png", "--model", with_checkpoint(a, "resize.pt", lambda p: p["spec"].update(preprocess={"mode": "resize", "resize": 10**9}))],
     "preprocess resize must be the shorter side"),
    ("checkpoint resample that is code", lambda a, s: ["predict", a / "x.png", "--model", with_checkpoint(a, "resample.pt", lambda p: p["spec"].update(preprocess={"mode": "letterbox", "resample": "__import__('os')"}))],
     "preprocess resample must be one of"),
    ("checkpoint sizes as strings", lambda a, s: ["export", with_checkpoint(a, "strings.pt", lambda p: node(p, "aten.view.default")["args"].__setitem__(1, ["-1", "64"])), "--artifacts", s],
     "argument 'size' must be List[int]"),
    ("checkpoint normalisation without std", lambda a, s: ["export", with_checkpoint(a, "nostd.pt", lambda p: p["spec"]["normalization"].pop("std")), "--artifacts", s], "std must be finite numbers"),
    ("checkpoint: code in a keyword argument's name", lambda a, s: ["predict", a / "x.png", "--model", with_checkpoint(a, "kw.pt", lambda p: node(p, "aten.linear.default")["kwargs"].update(
        {"inplace=False)\n__import__('os').system('touch " + str(s / "MARKER") + "')\n#": True}))], "unknown or repeated argument"),
    ("checkpoint: code in a node name", lambda a, s: ["verify", "--artifacts", a] if with_checkpoint(a, "model.pt", lambda p: p["program"]["nodes"][0].update(name="x = __import__('os')")) else [],
     "invalid or repeated node name"),
    ("checkpoint: an op that is not in the opset", lambda a, s: ["export", with_checkpoint(a, "op.pt", lambda p: node(p, "aten.linear.default").update(op="aten.empty.memory_format")), "--artifacts", s],
     "op is not in fcexport's opset"),
    ("checkpoint: size arithmetic on a list (3e8 copies)", lambda a, s: ["export", with_checkpoint(a, "mul.pt", lambda p: p["program"]["nodes"].insert(0, {"name": "boom", "op": "sym.mul", "args": [[{"ref": "x"}], 300000000]})), "--artifacts", s],
     "size arithmetic takes two integers"),
    ("checkpoint: a string times 2e9", lambda a, s: ["export", with_checkpoint(a, "str.pt", lambda p: p["program"]["nodes"].insert(0, {"name": "boom", "op": "sym.mul", "args": ["ab", 2000000000]})), "--artifacts", s],
     "size arithmetic takes two integers"),
    ("checkpoint: padding 20000", lambda a, s: ["export", with_checkpoint(a, "pad.pt", lambda p: p["program"]["nodes"].insert(0, {"name": "boom", "op": "aten.constant_pad_nd.default", "args": [{"ref": "x"}, [20000, 20000, 20000, 20000]]})), "--artifacts", s],
     "makes a tensor of shape (1, 1, 40008, 40008) for one image"),
    ("checkpoint: a shape that does not fit", lambda a, s: ["export", with_checkpoint(a, "fit.pt", lambda p: node(p, "aten.view.default")["args"].__setitem__(1, [-1, 63])), "--artifacts", s],
     "failed on input of shape (1, 1, 8, 8)"),
    ("checkpoint: BatchNorm eps < 0", lambda a, s: ["export", with_checkpoint(a, "eps.pt", lambda p: node(p, "aten._native_batch_norm_legit_no_training.default")["args"].__setitem__(6, -1.0)), "--artifacts", s],
     "argument 'eps' must be a finite number >= 0"),
    ("checkpoint: deeply nested arguments", lambda a, s: ["export", with_checkpoint(a, "deep.pt", lambda p: node(p, "aten.view.default")["args"].__setitem__(1, [[[[[[[1]]]]]]])), "--artifacts", s],
     "nested too deeply"),
    ("checkpoint: a layer named training", lambda a, s: ["export", with_checkpoint(a, "names.pt", lambda p: p["program"]["nodes"].insert(0, {"name": "training", "op": "aten.relu.default", "args": [{"ref": "_forward_hooks"}]})), "--artifacts", s],
     "uses '_forward_hooks' before it is defined"),
    ("checkpoint: a sparse tensor", lambda a, s: ["export", with_checkpoint(a, "sparse.pt", lambda p: p["tensors"].update({"fc1.weight": p["tensors"]["fc1.weight"].to_sparse()})), "--artifacts", s],
     "only dense CPU tensors are stored"),
    ("checkpoint: a compressed (zip bomb) record", lambda a, s: ["export", zip_bomb(a), "--artifacts", s], "is compressed"),
    ("checkpoint: dict keys that all hash alike", lambda a, s: ["export", hash_flood(s), "--artifacts", s],
     "keys of a hash it chooses"),
    *((f"checkpoint: keys that hash alike, through {route}", lambda a, s, route=route: ["export", hash_flood(s, route, 25_000),
       "--artifacts", s], "keys of a hash it chooses") for route in ("call", "alias", "build", "rebuild")),
    ("checkpoint: bytearray(2**34)", lambda a, s: ["export", hash_flood(s, "bytearray"), "--artifacts", s],
     "calls bytearray, which allocates what the file merely declares"),
    ("checkpoint: one mapping re-inserted 100,000 times", lambda a, s: ["export", hash_flood(s, "repeat", 100_000),
     "--artifacts", s], "took more than 15 s of CPU time"),
    ("checkpoint: 10,000 tool versions (inspect renders each)", lambda a, s: ["inspect", with_checkpoint(a, "versions.pt", lambda p: p["spec"].setdefault("provenance", {}).update(
        {f"tool{i}": "x" * 200 for i in range(10_000)}))], "tool versions; fcexport writes a few"),
    ("checkpoint: torch.save's format from before 1.6", lambda a, s: ["export", legacy_save(s), "--artifacts", s],
     "from before torch 1.6"),
    ("train --artifacts is a file", lambda a, s: ["train", "--data", "digits", "--artifacts", csv_file(s, "file", "x")], "a file is in the way"),
    ("--json-file is a folder", lambda a, s: ["bench", "--artifacts", a, "--backends", "onnxruntime", "--batch-sizes", "1", "--seconds", "0.01", "--json-file", s], "a folder has that name"),
    ("bench --repeat 0", lambda a, s: ["bench", "--artifacts", a, "--repeat", "0"], "repeat >= 1"),
    ("train --lr 1e30", lambda a, s: ["train", "--data", "digits", "--lr", "1e30", "--artifacts", s], "lr must be at most 10"),
    ("train --weight-decay inf", lambda a, s: ["train", "--data", "digits", "--weight-decay", "inf", "--artifacts", s], "weight decay must be in [0, 1)"),
    ("train --batch-size 1 with BatchNorm", lambda a, s: ["train", "--data", "digits", "--batch-size", "1", "--artifacts", s], "batch size 1 cannot train BatchNorm"),
    ("csv label 1e300", lambda a, s: ["train", "--data", csv_file(s, "big.csv", f"1e300,{ROW}\n1,{ROW}\n"), "--artifacts", s], "integer class labels"),
    ("csv with a 5 MB line", lambda a, s: ["train", "--data", csv_file(s, "long.csv", "1," + "0," * 2_500_000 + "0\n"), "--artifacts", s], "line 1 is longer than"),
]


@pytest.fixture
def folders(tmp_path, exported_dir):
    artifacts = Path(shutil.copytree(exported_dir, tmp_path / "artifacts"))
    save_png(artifacts / "x.png", (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return artifacts, scratch


@pytest.mark.parametrize("case, make, expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_exit_2_one_line_bounded(folders, case, make, expected):
    artifacts, scratch = folders
    r = run_limited(*make(artifacts, scratch))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert expected in lines[0], lines[0]


def test_code_in_a_stored_name_never_runs(folders):
    artifacts, scratch = folders
    marker = scratch / "MARKER"
    payload = {"inplace=False)\n__import__('os').system('touch " + str(marker) + "')\n#": True}
    hostile = with_checkpoint(artifacts, "model.pt", lambda p: node(p, "aten.linear.default")["kwargs"].update(payload))
    for argv in (["predict", artifacts / "x.png", "--model", hostile], ["fuse-bn", "--artifacts", artifacts, "--out", scratch / "f.pt"],
                 ["export", "--artifacts", artifacts], ["bench", "--artifacts", artifacts, "--backends", "eager"], ["verify", "--artifacts", artifacts]):
        r = run_limited(*argv)
        assert r.returncode == 2 and "unknown or repeated argument" in r.stderr, (argv, r.stderr)
    assert not marker.exists()


def test_csv_with_bom_and_class_names_as_labels_trains(tmp_path):
    rows = [f"{'shirt' if i % 2 else 'shoe'},{','.join(str((i * 7 + j) % 256) for j in range(16))}" for i in range(40)]
    path = csv_file(tmp_path, "named.csv", b"\xef\xbb\xbf" + "\n".join(rows).encode())
    r = run_limited("train", "--data", path, "--hidden", "8", "--epochs", "1", "--artifacts", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    from fcexport.checkpoint import load_model

    _, spec = load_model(tmp_path / "out" / "model.pt")
    assert spec.class_names == ("shirt", "shoe")  # the first row is data, not a header; the BOM is gone
    assert json.loads(r.stdout)["test_accuracy"] is not None


def test_stray_temp_file_with_a_huge_pid_does_not_break_writes(folders):
    artifacts, _ = folders
    (artifacts / f".model.onnx.{10**30}.abc.tmp").write_bytes(b"junk")
    r = run_limited("export", "--artifacts", artifacts, "--format", "onnx")
    assert r.returncode == 0, r.stderr
    assert not (artifacts / f".model.onnx.{10**30}.abc.tmp").exists()  # no such process: its leftover is removed


@pytest.mark.parametrize("factor, accepted", [(1, True), (2_000_000, False)])
def test_a_computed_shape_is_sized_before_anything_runs(factor, accepted, tmp_path):
    """An Expand whose shape is the input's own shape through a Reshape and a Mul (ops ONNX's shape inference does not
    follow): fcexport computes that shape at batch 1, so an honest one is sized and a huge one is refused, unread."""
    from fcexport.errors import FcxError
    from fcexport.onnx_checks import check_onnx_model, read_onnx_spec

    nodes = [helper.make_node("Shape", ["pixels"], ["s"]), helper.make_node("Reshape", ["s", "flat"], ["s2"]),
             helper.make_node("Mul", ["s2", "k"], ["s3"]), helper.make_node("Expand", ["pixels", "s3"], ["big"]),
             helper.make_node("ReduceMean", ["big"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Reshape", ["m", "two"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1])],
                              [helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
                               helper.make_tensor("k", TensorProto.INT64, [4], [1, factor, 1, 1]),
                               helper.make_tensor("two", TensorProto.INT64, [2], [-1, 1])])
    model = fcx_metadata(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), class_names=["0"])
    data = model.SerializeToString()
    if accepted:
        checked, peak = check_onnx_model(data, tmp_path / "m.onnx")
        assert 2 * 4 * 64 <= peak < 4096  # the input and its expanded copy, alive together (weights are not an image's)
        assert check_onnx_model(data, tmp_path / "m.onnx")[1] == peak  # recalled from the machine cache alike
        claimed = {p.key: p.value for p in checked.metadata_props} | {"peak_bytes": "1"}
        assert read_onnx_spec(claimed, tmp_path / "m.onnx", peak).peak_bytes == peak  # a file cannot claim less
    else:
        with pytest.raises(FcxError, match="makes 128,000,000 values for one image"):
            check_onnx_model(data, tmp_path / "m.onnx")


def _onnx_one_logit(nodes: list, initializers: list, opset: int = 17) -> bytes:
    """pixels (N, 1, 8, 8) -> `nodes` -> logits (N, 1), with fcexport's metadata for one class."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1])], initializers)
    return fcx_metadata(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), class_names=["0"]).SerializeToString()


def test_an_onnx_convolution_whose_im2col_scratch_is_too_large_is_refused(tmp_path):
    """4,096 channels expanded from the 8x8 input, a 3x3 Conv with padding 100: its CPU kernel's im2col columns hold
    4096 x 9 x 206^2 = 1.6e9 values, while every value the graph names stays small."""
    from fcexport.errors import FcxError
    from fcexport.onnx_checks import check_onnx_model

    def model(padding: int) -> bytes:
        return _onnx_one_logit(
            [helper.make_node("Expand", ["pixels", "wide"], ["xe"]), helper.make_node("Conv", ["xe", "w"], ["c"], pads=[padding] * 4),
             helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0)],
            [helper.make_tensor("wide", TensorProto.INT64, [4], [1, 4096, 8, 8]),
             onnx.numpy_helper.from_array(np.full((1, 4096, 3, 3), 1e-3, np.float32), "w")])

    assert check_onnx_model(model(1), tmp_path / "m.onnx")[1] >= 4 * 4096 * 9 * 64  # the columns count while it runs
    with pytest.raises(FcxError, match=r"node 'Conv' .*values alive at once, its kernel's scratch included"):
        check_onnx_model(model(100), tmp_path / "m.onnx")


def test_onnx_reductions_that_read_too_many_values_are_refused(tmp_path):
    """320 ReduceMax over one 2^26-value Expand: each value allowed, but 2e10 values read for one image."""
    from fcexport.errors import FcxError
    from fcexport.onnx_checks import check_onnx_model

    nodes = [helper.make_node("ReduceMean", ["pixels"], ["one"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Expand", ["one", "big_shape"], ["big"])]
    nodes += [helper.make_node("ReduceMax", ["big"], [f"m{i}"], axes=[2, 3], keepdims=0) for i in range(320)]
    nodes.append(helper.make_node("Sum", [f"m{i}" for i in range(320)], ["logits"]))
    data = _onnx_one_logit(nodes, [helper.make_tensor("big_shape", TensorProto.INT64, [4], [1, 1, 8192, 8192])])
    with pytest.raises(FcxError, match=r"reads and writes more than 2e\+10 values"):
        check_onnx_model(data, tmp_path / "m.onnx")
