"""Checkpoint reading: safetensors and PyTorch zip files made by the real libraries, read
back without torch; hostile pickles refused before anything in them runs; damaged files
and folders give one clear error naming the file."""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gguflab.convert.checkpoints import (
    Checkpoint,
    CheckpointError,
    TensorInfo,
    find_weight_files,
    load_f32,
)

try:
    import torch
except ImportError:  # pragma: no cover - CI installs torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is needed to make real test files")

TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}  # fmt: skip


def _mapped(arr: np.ndarray) -> bool:
    """Is the array (a view of) a memory map?"""
    a = arr
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def _as_numpy(t) -> np.ndarray:
    """What `load` should return for a torch tensor: bf16 as its raw bits."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _sample():
    g = torch.Generator().manual_seed(0)
    return {
        "tok_embd.weight": torch.randn(7, 5, generator=g),
        "layer.0.attn.weight": torch.randn(4, 6, generator=g).to(torch.float16),
        "layer.0.mlp.weight": torch.randn(3, 2, 4, generator=g).to(torch.bfloat16),
        "layer.0.norm": torch.randn(6, generator=g, dtype=torch.float64),
        "positions": torch.arange(10, dtype=torch.int64),
        "ids32": torch.arange(-3, 3, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }


def _check(ck: Checkpoint, expected: dict, zero_copy: bool = True) -> None:
    assert sorted(ck.names()) == sorted(expected)
    for name, t in expected.items():
        info = ck.info(name)
        assert isinstance(info, TensorInfo)
        assert info.name == name
        assert info.shape == tuple(t.shape)
        assert TORCH_DTYPES[info.dtype] == str(t.dtype).removeprefix("torch.")
        arr = ck.load(name)
        want = _as_numpy(t)
        assert arr.shape == want.shape and arr.dtype == want.dtype, name
        np.testing.assert_array_equal(arr, want)
        if zero_copy and t.numel() and t.is_contiguous():
            assert _mapped(arr), f"{name} was copied"
            assert not arr.flags.writeable
        if info.dtype in ("F32", "F16", "BF16", "F64"):
            f = load_f32(arr, info.dtype)
            assert f.dtype == np.float32 and f.shape == want.shape
            np.testing.assert_array_equal(f, t.detach().float().numpy())


# -- safetensors -----------------------------------------------------------------------------


@needs_torch
def test_safetensors_single_file(tmp_path):
    from safetensors.torch import save_file

    sd = _sample()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with Checkpoint(tmp_path) as ck:
        assert ck.files == [str(tmp_path / "model.safetensors")]
        _check(ck, sd)
        assert "positions" in ck and "nope" not in ck
        with pytest.raises(KeyError, match="nope"):
            ck.load("nope")
    with pytest.raises(CheckpointError, match="closed"):
        ck.load("positions")


def test_safetensors_names_in_file_order(tmp_path):
    from safetensors.numpy import save_file

    save_file(
        {"b": np.zeros(2, np.float32), "a": np.ones(3, np.float32)}, tmp_path / "x.safetensors"
    )
    with Checkpoint(tmp_path) as ck:
        names = ck.names()
        assert names == ck.names() and sorted(names) == ["a", "b"]
        starts = [ck._where[n].entries[n][1] for n in names]
        assert starts == sorted(starts)


@needs_torch
def test_safetensors_sharded_with_index(tmp_path):
    from safetensors.torch import save_file

    sd = _sample()
    names = list(sd)
    shards = {
        "model-00001-of-00002.safetensors": names[:4],
        "model-00002-of-00002.safetensors": names[4:],
    }
    for fn, ns in shards.items():
        save_file({n: sd[n] for n in ns}, tmp_path / fn)
    wm = {n: fn for fn, ns in shards.items() for n in ns}
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(wm.items()))}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "stray.safetensors").write_bytes(b"ignored: the index says which files")
    with Checkpoint(tmp_path) as ck:
        assert ck.files == [str(tmp_path / fn) for fn in shards]
        _check(ck, sd)
        assert set(ck.names()[:4]) == set(names[:4])  # shard order

    # an index naming a missing shard
    (tmp_path / "model-00002-of-00002.safetensors").rename(tmp_path / "gone")
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)
    assert "model-00002-of-00002.safetensors" in str(e.value)
    (tmp_path / "gone").rename(tmp_path / "model-00002-of-00002.safetensors")

    # an index naming a tensor its shard does not hold
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight.*not there") as e:
        Checkpoint(tmp_path)
    assert "model-00001-of-00002.safetensors" in str(e.value)

    # bad index json
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json: cannot read index"):
        Checkpoint(tmp_path)


def test_name_in_two_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "one.safetensors")
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="'a' is also in .*one.safetensors") as e:
        Checkpoint(tmp_path)
    assert "two.safetensors" in str(e.value)


def _st_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    "raw, cause",
    [
        (b"", "too short"),
        (b"\x05\x00\x00", "too short"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header length .* runs past the end"),
        (struct.pack("<Q", 5) + b"{}", "header length 5 runs past"),
        (struct.pack("<Q", 4) + b"{no}", "bad safetensors header"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "bad safetensors header"),
        (_st_bytes([], b""), "not a JSON object"),
        (_st_bytes(GOOD, bytes(12)), r"runs past the end of the data \(12 bytes\): truncated"),
        (_st_bytes({"w": {**GOOD["w"], "dtype": "F8_E4M3"}}, bytes(16)), "unsupported dtype"),
        (_st_bytes({"w": {**GOOD["w"], "dtype": None}}, bytes(16)), "unsupported dtype"),
        (_st_bytes({"w": {**GOOD["w"], "shape": [2, 3]}}, bytes(24)), "span 16 bytes.* needs 24"),
        (_st_bytes({"w": {**GOOD["w"], "shape": [-1, 2]}}, bytes(16)), "bad shape"),
        (_st_bytes({"w": {**GOOD["w"], "shape": "2x2"}}, bytes(16)), "bad shape"),
        (_st_bytes({"w": {**GOOD["w"], "shape": [0, 1 << 62]}}, b""), "too large"),
        (_st_bytes({"w": {**GOOD["w"], "data_offsets": [16, 0]}}, bytes(16)), "data_offsets"),
        (_st_bytes({"w": {**GOOD["w"], "data_offsets": [0]}}, bytes(16)), "data_offsets"),
        (_st_bytes({"w": 3}, bytes(16)), "not an object"),
        (struct.pack("<Q", 16) + b'{"a": 1, "a": 2}', "duplicate key"),
    ],
)
def test_safetensors_damaged(tmp_path, raw, cause):
    p = tmp_path / "model.safetensors"
    p.write_bytes(raw)
    with pytest.raises(CheckpointError, match=cause) as e:
        Checkpoint(tmp_path)
    assert str(e.value).startswith(str(p) + ": ")


def test_safetensors_truncated_anywhere(tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "src.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), np.float16)}, src)
    raw = src.read_bytes()
    d = tmp_path / "m"
    d.mkdir()
    for cut in range(0, len(raw), 3):
        (d / "model.safetensors").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="model.safetensors: "):
            Checkpoint(d)
    (d / "model.safetensors").write_bytes(raw)
    with Checkpoint(d) as ck:
        np.testing.assert_array_equal(ck.load("a"), np.arange(6, dtype=np.float32))


# -- finding the files -----------------------------------------------------------------------


def _st(path: Path, name: str = "w") -> None:
    from safetensors.numpy import save_file

    save_file({name: np.zeros(1, np.float32)}, path)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path)) and "no weights found" in msg
    for looked in ("model.safetensors", "pytorch_model.bin", "*.safetensors", "*.pth"):
        assert looked in msg
    with pytest.raises(CheckpointError, match="no such folder"):
        Checkpoint(tmp_path / "absent")


@needs_torch
def test_file_preference(tmp_path):
    def files(d):
        return find_weight_files(d)[0]

    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "extra.pth")
    assert files(tmp_path) == ["extra.pth", "weights.pt"]
    torch.save({"w": torch.zeros(1)}, tmp_path / "consolidated.00.pth")
    assert files(tmp_path) == ["consolidated.00.pth"]
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    assert files(tmp_path) == ["pytorch_model-00001-of-00002.bin"]
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert files(tmp_path) == ["pytorch_model.bin"]
    _st(tmp_path / "consolidated.safetensors")
    _st(tmp_path / "adapter.safetensors")
    assert files(tmp_path) == ["adapter.safetensors", "consolidated.safetensors"]
    _st(tmp_path / "model.safetensors")
    assert files(tmp_path) == ["model.safetensors"]
    with Checkpoint(tmp_path) as ck:
        assert ck.files == [str(tmp_path / "model.safetensors")]
    # a single file works as well as a folder
    with Checkpoint(tmp_path / "extra.pth") as ck:
        assert ck.names() == ["w"] and ck.files == [str(tmp_path / "extra.pth")]


@needs_torch
def test_consolidated_shards_with_same_names_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "consolidated.00.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth: tensor 'w' is also in"):
        Checkpoint(tmp_path)


# -- PyTorch zip -----------------------------------------------------------------------------


@needs_torch
def test_torch_bin_dtypes_and_views(tmp_path):
    sd = _sample()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd.update(
        {
            "base": base,
            "row": base[2],  # shares base's storage, offset 12
            "cols": base[:, 1:3],  # shared, non-contiguous
            "transposed": base.t(),  # shared, non-contiguous
            "expanded": torch.ones(1, 3).expand(4, 3),  # stride 0
            "bf16_t": torch.randn(3, 5).to(torch.bfloat16).t(),
            "f16_step": torch.arange(10, dtype=torch.float16)[::3],
            "param": torch.nn.Parameter(torch.randn(2, 3)),
        }
    )
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin") as z:
        storages = [n for n in z.namelist() if "/data/" in n]
    assert len(storages) < len(sd)  # views really share storages
    with Checkpoint(tmp_path) as ck:
        assert ck.names() == list(sd)  # pickle order
        _check(ck, sd)
        assert ck.load("transposed").flags.c_contiguous
        assert np.shares_memory(ck.load("row"), ck.load("base"))


@needs_torch
def test_torch_module_state_dict_and_parameter_with_state(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    sd = m.state_dict()  # an OrderedDict with a _metadata attribute
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with Checkpoint(tmp_path) as ck:
        _check(ck, dict(sd))
    p = torch.nn.Parameter(torch.ones(2, 2))
    p.note = "kept out"  # pickled via _rebuild_parameter_with_state
    torch.save({"p": p, "t": torch.ones(3, requires_grad=True)}, tmp_path / "pytorch_model.bin")
    with Checkpoint(tmp_path) as ck:
        _check(ck, {"p": p, "t": torch.ones(3)})


@needs_torch
@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_torch_nested_state_dict(tmp_path, key):
    sd = {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.float16)}
    torch.save({key: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "model.pt")
    with Checkpoint(tmp_path) as ck:
        _check(ck, sd)


@needs_torch
def test_torch_not_a_state_dict(tmp_path):
    torch.save({"a": torch.ones(2), "epoch": 3}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt: .*entry 'epoch' holds a int"):
        Checkpoint(tmp_path)
    torch.save([torch.ones(2)], tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a dict of tensors"):
        Checkpoint(tmp_path)


@needs_torch
def test_torch_sharded_with_index(tmp_path):
    sd = _sample()
    names = list(sd)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[5:],
        "pytorch_model-00002-of-00002.bin": names[:5],
    }
    for fn, ns in shards.items():
        torch.save({n: sd[n] for n in ns}, tmp_path / fn)
    wm = {n: fn for fn, ns in shards.items() for n in ns}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with Checkpoint(tmp_path) as ck:
        assert ck.files == [str(tmp_path / fn) for fn in shards]
        assert ck.names() == names[5:] + names[:5]
        _check(ck, sd)
    os.remove(tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        Checkpoint(tmp_path)


@needs_torch
def test_torch_legacy_format_refused(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="pytorch_model.bin: legacy .* not supported"):
        Checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        Checkpoint(tmp_path)


def _rezip(src: Path, dst: Path, edit=None, compress=zipfile.ZIP_STORED) -> None:
    """Copy a torch zip, member by member, letting `edit(name, data)` change or drop them."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", compress) as zo:
        for info in zi.infolist():
            data = zi.read(info)
            if edit is not None:
                data = edit(info.filename, data)
            if data is not None:
                zo.writestr(info.filename, data)


@needs_torch
def test_torch_compressed_members_are_read(tmp_path):
    sd = {"a": torch.randn(4, 4), "b": torch.randn(3).to(torch.bfloat16)}
    torch.save(sd, tmp_path / "src.bin")
    d = tmp_path / "m"
    d.mkdir()
    _rezip(tmp_path / "src.bin", d / "pytorch_model.bin", compress=zipfile.ZIP_DEFLATED)
    with Checkpoint(d) as ck:
        _check(ck, sd, zero_copy=False)


@needs_torch
def test_torch_damaged(tmp_path):
    torch.save({"a": torch.arange(6.0), "b": torch.ones(2)}, tmp_path / "src.bin")
    d = tmp_path / "m"
    d.mkdir()
    target = d / "pytorch_model.bin"

    def fails(edit, cause):
        _rezip(tmp_path / "src.bin", target, edit)
        with pytest.raises(CheckpointError, match=cause) as e:
            Checkpoint(d)
        assert str(e.value).startswith(str(target) + ": ")

    fails(lambda n, b: b"big\n" if n.endswith("byteorder") else b, "byte order 'big'")
    fails(lambda n, b: None if n.endswith("/data/0") else b, "no member src/data/0")
    fails(lambda n, b: b[:8] if n.endswith("/data/0") else b, "storage '0': 8 bytes.*need 24")
    fails(lambda n, b: None if n.endswith("data.pkl") else b, "no <prefix>/data.pkl")
    fails(lambda n, b: b[:40] if n.endswith("data.pkl") else b, "cannot read data.pkl")
    # a tensor reaching past its storage
    with zipfile.ZipFile(tmp_path / "src.bin") as z:
        pkl = z.read("src/data.pkl")
    bad = pkl.replace(b"K\x00K\x06\x85", b"K\x03K\x06\x85", 1)  # offset 0 -> 3, size 6
    assert bad != pkl
    fails(lambda n, b: bad if n.endswith("data.pkl") else b, "reach element 8 of a storage of 6")
    # size 6 -> 2**40 with stride 1 -> 0: an expansion too large to materialise
    big = pkl.replace(b"K\x00K\x06\x85", b"K\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x85", 1)
    big = big.replace(b"K\x01\x85", b"K\x00\x85", 1)
    fails(lambda n, b: big if n.endswith("data.pkl") else b, "too large to materialise")

    raw = (tmp_path / "src.bin").read_bytes()
    for cut in (10, len(raw) // 2, len(raw) - 30):
        target.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="pytorch_model.bin: "):
            Checkpoint(d)


# -- hostile pickles -------------------------------------------------------------------------


def _pkl_zip(path: Path, pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _call(module: str, name: str, arg: str, proto4: bool = False) -> bytes:
    """Pickle opcodes that push module.name(arg)."""
    a = arg.encode()
    if proto4:
        m, n = module.encode(), name.encode()
        fn = b"\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93"
    else:
        fn = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return fn + b"X" + struct.pack("<I", len(a)) + a + b"\x85R"


def _global(module: str, name: str, arg: str, proto4: bool = False) -> bytes:
    """A pickle of {"w": module.name(arg)}."""
    return b"\x80\x02}X\x01\x00\x00\x00w" + _call(module, name, arg, proto4) + b"s."


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvilClass:
    def __reduce__(self):
        return (_EvilClass, ())


def _hostile(marker: Path) -> dict[str, tuple[bytes, str]]:
    touch = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w')"
    return {
        "os.system": (_global("os", "system", touch), "os.system"),
        "posix.system": (_global("posix", "system", touch), "posix.system"),
        "builtins.eval": (_global("builtins", "eval", py), "builtins.eval"),
        "__builtin__.eval": (_global("__builtin__", "eval", py), "__builtin__.eval"),
        "builtins.exec": (_global("builtins", "exec", py, proto4=True), "builtins.exec"),
        "subprocess.Popen": (
            _global("subprocess", "Popen", touch, proto4=True), "subprocess.Popen"
        ),
        "torch.load": (_global("torch", "load", str(marker)), "torch.load"),
        "__reduce__": (pickle.dumps({"w": _Evil(touch)}, protocol=2), f"{os.system.__module__}.system"),
        "class": (pickle.dumps({"w": _EvilClass()}), f"{__name__}._EvilClass"),
        "INST": (b"(S'" + touch.encode() + b"'\nios\nsystem\n.", "os.system"),
        "nested in a tensor": (
            b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
            + _call("os", "system", touch) + b"tRs.", "os.system"
        ),
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(_hostile(Path("m"))))
def test_hostile_pickle_refused(tmp_path, case):
    marker = tmp_path / "MARKER"
    pkl, named = _hostile(marker)[case]
    _pkl_zip(tmp_path / "pytorch_model.bin", pkl)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'pytorch_model.bin'}: refusing to load: the pickle asks for {named}"
    )
    assert not marker.exists()


def test_hostile_pickle_would_have_run(tmp_path):
    """The hostile pickles are real: plain pickle.loads runs them."""
    marker = tmp_path / "MARKER"
    pickle.loads(_hostile(marker)["os.system"][0])
    assert marker.exists()


def test_unknown_storage_type_and_bad_persistent_id(tmp_path):
    pkl = _global("torch", "Float8_e4m3fnStorage", "x")
    _pkl_zip(tmp_path / "pytorch_model.bin", pkl)
    with pytest.raises(CheckpointError, match="unsupported storage type torch.Float8_e4m3fn"):
        Checkpoint(tmp_path)
    # a persistent id that is not a storage tuple
    pkl = b"\x80\x02}X\x01\x00\x00\x00wX\x03\x00\x00\x00abcQs."
    _pkl_zip(tmp_path / "pytorch_model.bin", pkl)
    with pytest.raises(CheckpointError, match="unexpected persistent id"):
        Checkpoint(tmp_path)


def test_load_f32():
    bits = np.array([0x3F80, 0xC000, 0x7F80], dtype=np.uint16)
    np.testing.assert_array_equal(load_f32(bits, "BF16"), [1.0, -2.0, np.inf])
    h = np.array([0.5, -1.5], dtype=np.float16)
    assert load_f32(h, "F16").dtype == np.float32
    f = np.array([1.0], dtype=np.float32)
    assert load_f32(f, "F32") is f
    np.testing.assert_array_equal(load_f32(np.array([3], np.int64), "I64"), [3.0])


@needs_torch
def test_nothing_copied(tmp_path):
    """Opening and loading allocates nothing near the size of the weights (numpy's
    allocations are traced by tracemalloc; the mapped pages are not)."""
    import tracemalloc

    big = torch.randn(2048, 2048)  # 16 MiB
    torch.save({"w": big}, tmp_path / "pytorch_model.bin")
    from safetensors.torch import save_file

    d = tmp_path / "st"
    d.mkdir()
    save_file({"w": big.to(torch.bfloat16)}, d / "model.safetensors")
    for folder in (tmp_path, d):
        tracemalloc.start()
        try:
            with Checkpoint(folder) as ck:
                arr = ck.load("w")
                arr[-1, -1].item()  # touch the last page
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert arr.shape == (2048, 2048) and _mapped(arr)
        assert peak < 1 << 20, f"{folder}: {peak} bytes allocated"
