"""The batched tensor I/O behind the scale work (issue: a DeepSeek-V3-sized job in seconds): many small tensors read,
hashed and written a run of neighbours at a time. Each batched path must give exactly what the one-tensor path
gives — the same arrays, the same bytes and digests, the same NaN findings, the same refusals — whatever the
order, gaps, files and sizes of the tensors asked for."""
from __future__ import annotations

import errno
import hashlib
import os
import json
import random
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mpconvert import safetensors_io as sio
from mpconvert.errors import UserError

from helpers import DENSE_RULES, build, write_recipe


def _sources(tmp_path):
    """Two real safetensors files (written by the safetensors library) of mixed dtypes and sizes, some with NaN or
    infinite values; name → TensorInfo over both."""
    g = torch.Generator().manual_seed(0)
    files = {}
    for f in ("a", "b"):
        t = {f"{f}.{i}.w": torch.randn(3 + i % 5, 7, generator=g).to((torch.float32, torch.bfloat16, torch.float16)[i % 3])
             for i in range(40)}
        t.update({f"{f}.{i}.q": torch.randint(-2**31, 2**31 - 1, (5, 3 + i % 4), dtype=torch.int32, generator=g)
                  for i in range(40)})
        t.update({f"{f}.{i}.s": torch.randn(11, generator=g).to(torch.float8_e4m3fn) for i in range(10)})
        t[f"{f}.3.w"][0, 0] = float("nan")
        t[f"{f}.7.w"][1, 2] = float("inf")
        t[f"{f}.2.s"] = torch.full((11,), float("nan")).to(torch.float8_e4m3fn)
        t[f"{f}.odd"] = torch.arange(13, dtype=torch.uint8)  # an odd size: later tensors lie at odd offsets
        t[f"{f}.big"] = torch.randn(300, 100, generator=g)
        save_file(t, tmp_path / f"{f}.safetensors")
        files.update(sio.read_header(tmp_path / f"{f}.safetensors")[0])
    return files


def _subsets(infos):
    rnd = random.Random(1)
    names = sorted(infos)
    yield [infos[n] for n in names]  # everything, in name order (not file order)
    for k in (1, 2, 7, 50):
        for _ in range(4):
            yield [infos[n] for n in rnd.sample(names, k)]  # gaps, both files, any order


def test_load_stacked_is_load_array_stacked_for_any_subset(tmp_path, monkeypatch):
    """Groups of one dtype and shape, read together however their tensors lie in the files (gaps, both files, any
    order) and however the reads are cut (one read per file; cut at every gap; reads smaller than some tensors),
    give exactly np.stack of each tensor's load_array."""
    infos = {n: t for n, t in _sources(tmp_path).items() if t.dtype in ("F32", "BF16", "F16", "I32", "U8")}
    for near, span in ((sio.NEAR, sio.SPAN), (0, sio.SPAN), (64, 100)):
        monkeypatch.setattr(sio, "NEAR", near)
        monkeypatch.setattr(sio, "SPAN", span)
        for subset in _subsets(infos):
            groups: dict = {}
            for t in subset:
                groups.setdefault((t.dtype, t.shape), []).append(t)
            for group, a in zip(groups.values(), sio.load_stacked(list(groups.values()))):
                b = np.stack([sio.load_array(t) for t in group])
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), group[0].name
    assert sio.load_stacked([]) == []
    with pytest.raises(ValueError, match="mixes dtypes or shapes"):
        sio.load_stacked([list(infos.values())])


def test_digest_and_scan_many_is_digest_and_scan_for_any_subset(tmp_path, monkeypatch):
    infos = _sources(tmp_path)
    for chunk in (sio.HASH_SPAN, 4096):  # small: runs split, and the big tensor streams on its own
        monkeypatch.setattr(sio, "HASH_SPAN", chunk)
        for subset in _subsets(infos):
            want = {t.name: sio.digest_and_scan(t) for t in subset}
            for workers in (1, 3):  # one thread and several: the same digests, each file's in offset order
                got = [(t, sha, bad) for t, sha, bad in sio.digest_and_scan_many(subset, workers)]
                assert {t.name: (sha, bad) for t, sha, bad in got} == want and len(got) == len(subset)
                for f in {t.file for t in subset}:
                    starts = [t.start for t, _, _ in got if t.file == f]
                    assert starts == sorted(starts)
    found = {t.name for t, _, bad in sio.digest_and_scan_many(list(infos.values())) if bad}
    assert found == {"a.3.w", "a.7.w", "a.2.s", "b.3.w", "b.7.w", "b.2.s"}


def test_batched_reads_refuse_a_file_truncated_under_them(tmp_path):
    infos = _sources(tmp_path)
    ints = [t for t in infos.values() if t.name.startswith("a.") and t.dtype == "I32"]
    sio.forget_open_files()
    raw = (tmp_path / "a.safetensors").read_bytes()
    last = max(ints, key=lambda t: t.start)
    (tmp_path / "a.safetensors").write_bytes(raw[:last.start + 4])  # cut inside the last one asked for
    by_shape: dict = {}
    for t in ints:
        by_shape.setdefault(t.shape, []).append(t)
    with pytest.raises(UserError, match="truncated while reading tensor"):
        sio.load_stacked(list(by_shape.values()))
    for workers in (1, 3):  # raised in a hashing thread, it reaches the caller; no thread is left behind
        with pytest.raises(UserError, match="truncated while reading tensor"):
            list(sio.digest_and_scan_many(ints, workers))
        assert not [t for t in threading.enumerate() if t.name.startswith("mpconvert-hash")]


def test_header_bytes_are_what_json_dumps_writes():
    names = ["model.layers.0.mlp.experts.10.down_proj.qweight", "a", 'odd "quoted" \\ näme', "x.y:z+1/2-3"]
    tensors = [sio.PendingTensor(n, d, s, sio.DTYPE_SIZE[d] * int(torch.tensor(s).prod()))
               for n, d, s in zip(names, ("I32", "BF16", "F8_E4M3", "U8"), ((4, 8), (), (3, 0, 2), (5,)))]
    for meta in ({"format": "pt"}, {}, {"z": "1", "a": 'q"'}):
        h = {"__metadata__": dict(sorted(meta.items()))}
        off = 0
        for t in tensors:
            h[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        want = json.dumps(h, separators=(",", ":")).encode()
        want += b" " * (-len(want) % 8)
        assert sio.header_bytes(tensors, meta) == struct.pack("<Q", len(want)) + want


def test_index_json_is_what_json_dumps_writes():
    """The index is written by json's C encoder (indent=2 would take the pure-Python one): the same text as
    json.dumps(indent=2, sort_keys=True) for any names — quotes, backslashes, non-ASCII, control characters — and
    sizes, empty map included."""
    from mpconvert.writer import index_json

    rnd = random.Random(3)
    chars = 'abc.XYZ_09-/:+"\\é\u2603\n\t'
    for _ in range(2000):
        m = {"".join(rnd.choice(chars) for _ in range(rnd.randint(1, 12))):
             "".join(rnd.choice(chars) for _ in range(rnd.randint(0, 8))) for _ in range(rnd.choice([0, 1, 2, 5, 50]))}
        total = rnd.choice([0, 1, 2**40, 2**63 - 1])
        want = json.dumps({"metadata": {"total_size": total}, "weight_map": m}, indent=2, sort_keys=True) + "\n"
        assert index_json(total, m) == want


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-copy", "read-and-write"])
@pytest.mark.parametrize("overlap", [None, 0], ids=["hash-inline-below-1MiB", "hash-every-buffer-in-the-thread"])
def test_write_file_copies_runs_and_streams_the_rest(tmp_path, monkeypatch, overlap, kernel):
    """Whichever way each tensor goes — a run of neighbours, a kernel copy hashed as read back, a stream of chunks,
    a tensor made here — the file holds exactly the sources' bytes in the order asked, and each digest is its
    bytes'."""
    infos = _sources(tmp_path)
    monkeypatch.setattr(sio, "CHUNK", 4096)  # runs split at 4 KB; the big tensor is copied chunk by chunk
    monkeypatch.setattr(sio._KERNEL, "on", kernel)
    monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 120)  # with the kernel copy on: many tensors copied alone, between runs
    if overlap is not None:  # every run and chunk hashed on the second thread while the next is read and written
        monkeypatch.setattr(sio.Hasher, "OVERLAP", overlap)
    rnd = random.Random(2)
    order = sorted(infos.values(), key=lambda t: (t.file.name, t.start))  # mostly runs of neighbours ...
    order = order[:30] + rnd.sample(order[30:], len(order) - 30)  # ... then gaps, both files, any order
    pending = [sio.PendingTensor(t.name, t.dtype, t.shape, t.nbytes, src=t) for t in order]
    made = torch.arange(6, dtype=torch.int32)  # and a tensor that is made, not copied, among them
    pending.insert(17, sio.PendingTensor("made", "I32", (6,), 24, lambda: iter([made.numpy().tobytes()])))
    digests = sio.write_file(tmp_path / "out.safetensors", pending, {"format": "pt"})
    out = load_file(tmp_path / "out.safetensors")
    src = {**load_file(tmp_path / "a.safetensors"), **load_file(tmp_path / "b.safetensors")}
    assert list(sio.read_header(tmp_path / "out.safetensors")[0]) == [p.name for p in pending]
    for name, t in src.items():
        assert out[name].dtype == t.dtype and out[name].view(torch.uint8).equal(t.view(torch.uint8)), name
        assert digests[name] == sio.sha256_of(infos[name])
    assert out["made"].equal(made) and digests["made"] == hashlib.sha256(made.numpy().tobytes()).hexdigest()


def test_a_made_tensor_that_fails_midway_stops_the_write_with_its_error(tmp_path, monkeypatch):
    """An error while a hash runs beside the I/O is the error the writer raises (not lost in the thread)."""
    monkeypatch.setattr(sio.Hasher, "OVERLAP", 0)

    def chunks():
        yield b"x" * 64
        raise UserError("tensor 'made': the rewrite failed")
    with pytest.raises(UserError, match="the rewrite failed"):
        sio.write_file(tmp_path / "out.safetensors", [sio.PendingTensor("made", "U8", (128,), 128, chunks)], {})


def test_an_error_in_the_hashing_thread_is_raised_by_the_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(sio.Hasher, "OVERLAP", 0)

    class Broken:
        def update(self, b):
            raise MemoryError("hash failed")
    monkeypatch.setattr(sio.hashlib, "sha256", Broken)
    with pytest.raises(MemoryError, match="hash failed"):
        sio.write_file(tmp_path / "out.safetensors",
                       [sio.PendingTensor("made", "U8", (128,), 128, lambda: iter([b"x" * 64, b"y" * 64]))], {})


def test_a_source_shorter_than_its_header_says_is_refused_by_the_writer(tmp_path):
    infos = _sources(tmp_path)
    run = sorted((t for t in infos.values() if t.name.startswith("b.")), key=lambda t: t.start)[:5]
    sio.forget_open_files()
    raw = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(raw[:run[-1].start + 1])
    with pytest.raises(UserError, match="truncated"):
        sio.write_file(tmp_path / "out.safetensors", [sio.PendingTensor(t.name, t.dtype, t.shape, t.nbytes, src=t)
                                                      for t in run], {})


@pytest.mark.parametrize("read_buf", [7, 1000, 1 << 20], ids=["tiny-buffer", "many-buffers", "one-buffer"])
def test_reads_into_a_reused_buffer_give_the_bytes_of_a_plain_read(tmp_path, monkeypatch, read_buf):
    """sha256_of, digest_and_scan and same_bytes read through one reused buffer: whatever its size against the
    tensors' (odd, many per tensor, larger than all), they agree with plain reads — the digest of the bytes, NaN where
    there is one (also in a last partial buffer), and equality that sees a single changed byte anywhere."""
    monkeypatch.setattr(sio, "READ_BUF", read_buf)
    infos = _sources(tmp_path)
    raw = {p: p.read_bytes() for p in {t.file for t in infos.values()}}

    def plain(t):
        return raw[t.file][t.start:t.start + t.nbytes]
    for t in infos.values():
        assert sio.sha256_of(t) == hashlib.sha256(plain(t)).hexdigest(), t.name
        assert sio.digest_and_scan(t) == (hashlib.sha256(plain(t)).hexdigest(),
                                          sio.has_nonfinite(t.dtype, plain(t))), t.name
    same_size = [(a, b) for a in infos.values() for b in infos.values() if a.nbytes == b.nbytes][:400]
    for a, b in same_size:
        assert sio.same_bytes(a, b) == (plain(a) == plain(b)), (a.name, b.name)
    big = infos["b.big"]
    for at in (0, 1, big.nbytes // 2, big.nbytes - 1):  # one byte changed in a copy of the file: not the same
        changed = bytearray(raw[big.file])
        changed[big.start + at] ^= 1
        (tmp_path / f"changed{at}.safetensors").write_bytes(changed)
        other = sio.read_header(tmp_path / f"changed{at}.safetensors")[0]["b.big"]
        assert not sio.same_bytes(big, other) and sio.same_bytes(big, infos["b.big"])
    nan_last = sio.read_header(tmp_path / "a.safetensors")[0]["a.3.w"]  # NaN in its first value
    assert sio.digest_and_scan(nan_last)[1]


@pytest.mark.parametrize("refusal", [errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS])
def test_where_the_kernel_cannot_copy_the_bytes_go_through_read_and_write(tmp_path, monkeypatch, refusal):
    """copy_file_range refuses across some filesystems and on old kernels: the first refusal switches the kernel copy
    off and the same bytes and digests come through read and write. (The refusal is the kernel's errno, raised here:
    this machine's filesystems all accept the copy.)"""
    infos = _sources(tmp_path)
    pending = [sio.PendingTensor(t.name, t.dtype, t.shape, t.nbytes, src=t) for t in infos.values()]
    monkeypatch.setattr(sio._KERNEL, "on", True)
    monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 64)
    want = sio.write_file(tmp_path / "want.safetensors", pending, {})
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(refusal, os.strerror(refusal))
    monkeypatch.setattr(sio.os, "copy_file_range", refuse)
    assert sio.write_file(tmp_path / "out.safetensors", pending, {}) == want
    assert len(calls) == 1 and not sio._KERNEL.on  # switched off at the first refusal
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-copy", "read-and-write"])
def test_progress_counts_every_byte_and_moves_inside_a_large_tensor(tmp_path, monkeypatch, kernel):
    """The progress bar gets every data byte once, and a large tensor moves it as it is copied, not only at its end
    (a kernel copy goes in pieces; a stream in chunks)."""
    infos = _sources(tmp_path)
    monkeypatch.setattr(sio._KERNEL, "on", kernel)
    monkeypatch.setattr(sio._KernelCopy, "PIECE", 1000)
    monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 64 << 10)  # only the 120 KB tensors are copied alone
    monkeypatch.setattr(sio, "CHUNK", 4096)
    monkeypatch.setattr(sio._Progress, "EVERY", 1)
    pending = [sio.PendingTensor(t.name, t.dtype, t.shape, t.nbytes, src=t) for t in infos.values()]
    calls = []
    sio.write_file(tmp_path / "out.safetensors", pending, {}, calls.append)
    assert sum(calls) == sum(t.nbytes for t in infos.values())
    piece, big = (1000 if kernel else 4096), infos["a.big"].nbytes  # a.big and b.big: 120 KB each
    assert len([n for n in calls if n <= piece]) >= 2 * (big // piece)


def test_a_filesystem_that_copies_nothing_gets_read_and_write(tmp_path, monkeypatch):
    """Some filesystems answer copy_file_range with 0 bytes from a file that holds them (coreutils' cp falls back
    there too): not mistaken for a truncated source — the same bytes through read and write."""
    infos = _sources(tmp_path)
    pending = [sio.PendingTensor(t.name, t.dtype, t.shape, t.nbytes, src=t) for t in infos.values()]
    monkeypatch.setattr(sio._KERNEL, "on", True)
    monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 64)
    want = sio.write_file(tmp_path / "want.safetensors", pending, {})
    monkeypatch.setattr(sio.os, "copy_file_range", lambda *args: 0)
    assert sio.write_file(tmp_path / "out.safetensors", pending, {}) == want and not sio._KERNEL.on
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()


def test_an_output_on_another_filesystem_gets_the_same_bytes(llama, cli, tmp_path, monkeypatch):
    """For real: Linux refuses copy_file_range from this disk to a tmpfs (/dev/shm) with EXDEV; that build falls back
    to read and write and gives shards and a manifest byte-identical to a build on the sources' own filesystem."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm as a second, writable filesystem")
    monkeypatch.setattr(sio._KERNEL, "on", True)
    monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 4096)  # the tiny model's larger tensors go through the kernel copy
    sources = {"fp8": "ct-fp8-static", "int8": "ct-w8a8", "gptq": "gptq", "awq": "awq", "fp8blk": "native-fp8-block"}
    recipe = write_recipe(tmp_path, llama, sources, "gptq", DENSE_RULES)
    build(cli, recipe, tmp_path / "here")
    assert sio._KERNEL.on  # same filesystem: the kernel copied
    elsewhere = Path(tempfile.mkdtemp(dir=shm, prefix="mpconvert-test-"))
    try:
        build(cli, recipe, elsewhere / "out")
        assert not sio._KERNEL.on  # refused (EXDEV), switched off for that build
        files = sorted(p.name for p in (tmp_path / "here").iterdir())
        assert files == sorted(p.name for p in (elsewhere / "out").iterdir())
        for f in files:
            assert (tmp_path / "here" / f).read_bytes() == (elsewhere / "out" / f).read_bytes(), f
    finally:
        shutil.rmtree(elsewhere)


def test_a_source_truncated_under_a_kernel_copy_is_refused(tmp_path, monkeypatch):
    infos = _sources(tmp_path)
    monkeypatch.setattr(sio._KERNEL, "on", True)
    monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 64)
    big = infos["b.big"]
    sio.forget_open_files()
    raw = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(raw[:big.start + big.nbytes // 2])
    with pytest.raises(UserError, match="truncated while reading tensor 'b.big'"):
        sio.write_file(tmp_path / "out.safetensors", [sio.PendingTensor("b.big", big.dtype, big.shape, big.nbytes,
                                                                        src=big)], {})


def test_where_the_sources_live_does_not_change_the_shards(llama, cli, tmp_path):
    """The writer orders a shard's copies by where they lie in their sources — by the recipe's source label, file
    name and offset, never by the sources' paths: the same sources elsewhere give the same shards and index."""
    sources = {"fp8": "ct-fp8-static", "int8": "ct-w8a8", "gptq": "gptq", "awq": "awq", "fp8blk": "native-fp8-block"}
    moved = {k: shutil.copytree(p, tmp_path / "elsewhere" / f"zz-{k}") for k, p in llama.items()}
    build(cli, write_recipe(tmp_path, llama, sources, "gptq", DENSE_RULES), tmp_path / "a", "--shard-size", "600KB")
    (tmp_path / "r2").mkdir()
    build(cli, write_recipe(tmp_path / "r2", moved, sources, "gptq", DENSE_RULES), tmp_path / "b", "--shard-size",
          "600KB")
    shards = sorted(p.name for p in (tmp_path / "a").glob("model*"))
    assert len(shards) >= 3 and shards == sorted(p.name for p in (tmp_path / "b").glob("model*"))
    for f in shards:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
