"""The safetensors container: a lazy reader that parses headers only, and a streaming writer.

We parse the header ourselves (8-byte little-endian length + JSON) instead of going through a framework so that
build can copy tensor bytes verbatim with bounded memory, and so that a truncated or hostile file is rejected with a
precise message before any byte is written.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import operator
import os
import re
import stat as statmod
import struct
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring_ascii as _json_string
from dataclasses import dataclass
from itertools import chain, compress, repeat
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from .errors import UserError
from .forked import usable_cores

DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# dtypes the safetensors format defines (0.7) that no format mpconvert mixes stores: what a checkpoint holding one is
FOREIGN_DTYPES = {"F4": "a 4-bit float, two per byte", "F6_E2M3": "a 6-bit float", "F6_E3M2": "a 6-bit float",
                  "F8_E8M0": "an MX block scale", "C64": "a complex number"}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own cap
CHUNK = 16 * 1024 * 1024  # copy granularity: bounds memory per tensor, large enough for full disk speed
READ_BUF = 1024 * 1024  # a reused read buffer for hashing and comparing: stays in the CPU's cache
KERNEL_COPY_MIN = 1 << 20  # verbatim tensors from this size on are copied file to file in the kernel
PT_METADATA = {"format": "pt"}  # every shard build writes: loaders such as transformers check it


def nbytes_of(dtype: str, shape) -> int:
    """Bytes of a tensor of this dtype and shape (the one count build, plan and the manifest use)."""
    n = DTYPE_SIZE[dtype]
    for d in shape:
        n *= d
    return n


class TensorInfo(NamedTuple):
    """Where one tensor's bytes live. `start` is absolute in `file`. (A NamedTuple: a DeepSeek-V3-sized job makes
    400k of them, and a frozen dataclass's constructor costs four times as much.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int


# Tensor names: what checkpoints actually use (module paths, digits, a few separators). Anything else — a newline,
# a control character, a space — is refused: names end up in regexes, file listings and error messages.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/:+]{0,499}")


def _no_duplicates(pairs: list) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


class _Duplicate(Exception):
    pass


def _parse_header(raw: bytes):
    """json.loads, refusing duplicate keys. A hook on every object costs more than the parse itself at 400k tensors,
    so the plain parse runs first: when every entry has exactly one dtype, shape and data_offsets (counted in the raw
    bytes), no key can repeat; otherwise the header is parsed again with the duplicate check, which names it."""
    header = json.loads(raw)
    if isinstance(header, dict):
        entries = len(header) - ("__metadata__" in header)
        if all(raw.count(k) == entries for k in (b'"dtype"', b'"shape"', b'"data_offsets"')):
            return header
    return json.loads(raw, object_pairs_hook=_no_duplicates)


def regular_file_size(path: Path) -> int:
    """The size of a regular file (after links). A model directory holds only regular files: a FIFO there would
    block the first read forever, a device would read without end."""
    st = os.stat(path)
    if not statmod.S_ISREG(st.st_mode):
        kind = "a directory" if statmod.S_ISDIR(st.st_mode) else "a FIFO" if statmod.S_ISFIFO(st.st_mode) else \
            "a device or socket"
        raise UserError(f"{path}: is {kind}, not a regular file; a checkpoint holds files — replace it with one")
    return st.st_size


def _is_int(x) -> bool:
    return type(x) is int  # bool is an int subclass in Python; JSON true must not pass as 1


def read_header(path: Path) -> tuple[dict[str, TensorInfo], bytes]:
    """Parse and validate one .safetensors header, as strictly as the official library or more.

    Refused, naming the file and the tensor: a header longer than the file; invalid or non-object JSON; duplicate
    keys; names outside [A-Za-z0-9_.-/:+]; unknown dtypes; shapes that are not lists of non-negative integers;
    offsets that are not two integers with 0 <= begin <= end; a byte range that disagrees with dtype x shape; and a
    data area not covered exactly — overlapping tensors (one tensor's bytes aliasing another's), gaps, or bytes after
    the last tensor (safetensors refuses all three). Returns the tensors and the raw header bytes (fingerprints)."""
    try:
        size = regular_file_size(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: header length {n} exceeds the file ({size} bytes): the file is truncated "
                                f"or not safetensors; re-download or re-save it")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    data_start, data_len = 8 + n, size - 8 - n
    canonical = _canonical_header(raw)
    if canonical is not None:  # proven valid JSON in the canonical layout without parsing it as JSON
        meta, columns = canonical
        out = _canonical_entries(path, columns, data_start, data_len) if _meta_ok(meta) else None
        if out is not None:
            return out, raw
    try:
        header = _parse_header(raw)
    except _Duplicate as e:
        raise UserError(f"{path}: header lists {e.args[0]!r} twice; the file is corrupt (safetensors refuses "
                        f"duplicate keys) — re-save it") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: header is not a JSON object; the file is corrupt")
    meta = header.pop("__metadata__", {})
    if not _meta_ok(meta):
        raise UserError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    found = _ENTRY.findall(raw)
    columns = [list(column) for column in zip(*found)] if found else [[] for _ in range(_GROUPS)]
    out = _canonical_entries(path, columns, data_start, data_len) if len(found) == len(header) else None
    if out is None:  # not in the canonical layout, or something is wrong: check entry by entry, naming the culprit
        out = {name: _tensor_info(path, name, entry, data_start) for name, entry in header.items()}
        _check_coverage(path, out.values(), data_start, data_len)
    return out, raw


# One header entry as the safetensors library (and every writer we know) lays it out. When every entry of a header
# matches this, the regex has already checked what _tensor_info checks one by one (name characters, the three keys,
# shape and offsets as lists of non-negative integers) — in C, which at 400k entries is seconds faster. Integers as
# JSON writes them (no leading zero, which json.loads and safetensors refuse) and of at most 18 digits (so they fit
# an int64: a longer one is not a file offset, and the checks entry by entry then name it).
_INT = rb"(?:0|[1-9][0-9]{0,17})"
_ENTRY = re.compile(rb'"([A-Za-z0-9_][A-Za-z0-9_.\-/:+]{0,499})":\{"dtype":"([A-Z0-9_]+)","shape":\[((?:' + _INT
                    + rb"(?:," + _INT + rb')*)?)\],"data_offsets":\[(' + _INT + rb"),(" + _INT + rb")\]\}")
_ENTRY_COMMA = re.compile(_ENTRY.pattern + rb",")  # an entry and the comma after it
_GROUPS = _ENTRY.groups  # name, dtype, shape, begin, end


def _meta_ok(meta) -> bool:
    return isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())


_META = b'"__metadata__":'


def _canonical_header(raw: bytes):
    """(metadata, entries) when the header is, byte for byte, `{` [`"__metadata__":` object `,`] canonical entries
    joined by `,` `}` and space padding — then it is valid JSON with no escapes in any name, and json.loads (1.4 s
    for a DeepSeek-V3-sized job's 171k-entry header) is not needed; None for anything else (the caller parses it as
    JSON and checks it entry by entry)."""
    body = raw.rstrip(b" ")
    if len(body) < 2 or body[:1] != b"{" or body[-1:] != b"}":
        return None
    pos, meta = 1, {}
    if body.startswith(_META, 1):
        try:
            text = body[1 + len(_META):].decode()
            meta, end = json.JSONDecoder(object_pairs_hook=_no_duplicates).raw_decode(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _Duplicate):
            return None
        pos = 1 + len(_META) + len(text[:end].encode())
        if body[pos:pos + 1] != b",":
            return None if pos != len(body) - 1 else (meta, [[] for _ in range(_GROUPS)])
        pos += 1
    # The entries, each with a comma after it (the closing brace's place takes one too). re.split gives what lies
    # between the matches (which never overlap and come in order) and each match's groups: when everything between
    # them is empty, the entries tile the span — nothing between two, nothing before the first or after the last.
    # Every column comes out as a slice, in C.
    parts = _ENTRY_COMMA.split(body[pos:-1] + b",")
    between = parts[::_GROUPS + 1]
    if len(between) < 2 or any(between):
        return None
    return meta, [parts[k::_GROUPS + 1] for k in range(1, _GROUPS + 1)]


_DTYPE_OF, _DIMS_OF, _NBYTES_OF = (operator.itemgetter(i) for i in range(3))
_new_info = functools.partial(tuple.__new__, TensorInfo)  # TensorInfo(*fields) without its Python-level __new__


def _canonical_entries(path: Path, columns: list, data_start: int, data_len: int):
    """The tensors of a header whose every entry is canonical (`columns`: _ENTRY's groups, one list each) and whose
    data area is tiled exactly; None when an entry or the tiling is not (the caller then checks entry by entry and
    names what is wrong). Column by column — C loops over 171k entries, Python only per distinct (dtype, shape)."""
    names_b, dtypes_b, shapes_b, begins_b, ends_b = columns
    if not names_b:
        return None if data_len else {}
    keys = list(zip(dtypes_b, shapes_b))
    kinds: dict[tuple[bytes, bytes], tuple] = {}  # (dtype, shape) as written → (dtype, dims, bytes): experts repeat
    for dtype_b, shape_b in set(keys):
        dtype = dtype_b.decode()
        if dtype not in DTYPE_SIZE:
            return None
        dims = tuple(map(int, shape_b.split(b","))) if shape_b else ()
        nbytes = nbytes_of(dtype, dims)
        if nbytes > data_len or _too_many_elements(dims):
            return None  # (and never past an int64)
        kinds[(dtype_b, shape_b)] = (dtype, dims, nbytes)
    kind = list(map(kinds.__getitem__, keys))
    n = len(names_b)
    starts, ends = np.fromiter(map(int, begins_b), np.int64, n), np.fromiter(map(int, ends_b), np.int64, n)
    sizes = ends - starts
    if not np.array_equal(sizes, np.fromiter(map(_NBYTES_OF, kind), np.int64, n)):
        return None  # a byte range that disagrees with dtype x shape (also end < begin: sizes are never negative)
    order = np.lexsort((sizes, starts))
    s, e = starts[order], ends[order]
    if s[0] != 0 or e[-1] != data_len or not np.array_equal(s[1:], e[:-1]):
        return None
    names = list(map(bytes.decode, names_b))
    out = dict(zip(names, map(_new_info, zip(names, map(_DTYPE_OF, kind), map(_DIMS_OF, kind), repeat(path),
                                             (starts + data_start).tolist(), sizes.tolist()))))
    if len(out) != n or "__metadata__" in out:
        return None  # a name twice (json.loads would keep only the last); metadata out of its place
    return out


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    if not _NAME.fullmatch(name):
        raise UserError(f"{path}: tensor name {name!r} has characters outside [A-Za-z0-9_.-/:+] (or is empty or "
                        f"over 500 characters); the file is corrupt or not a model checkpoint")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise UserError(f"{path}: tensor {name!r}: a header entry has exactly dtype, shape and data_offsets; "
                        f"the file is corrupt")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZE:
        if isinstance(dtype, str) and dtype in FOREIGN_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {dtype} ({FOREIGN_DTYPES[dtype]}), which none of the "
                            f"formats mpconvert mixes stores (they use {', '.join(DTYPE_SIZE)}); take this module "
                            f"from a source in a supported format")
        raise UserError(f"{path}: tensor {name!r} has dtype {dtype!r}, which is not a safetensors dtype; the file is "
                        f"corrupt — re-download or re-save it")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise UserError(f"{path}: tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers "
                        f"— the file is corrupt")
    if _too_many_elements(shape):
        raise UserError(f"{path}: tensor {name!r} has shape {shape!r}, more than 2^63 - 1 elements; the file is "
                        f"corrupt (safetensors refuses an element count that overflows)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; they must be two integers "
                        f"0 <= begin <= end — the file is corrupt")
    b, e = offsets
    info = TensorInfo(name, dtype, tuple(shape), path, data_start + b, e - b)
    if info.nbytes != nbytes_of(dtype, info.shape):
        raise UserError(f"{path}: tensor {name!r} byte range {b}..{e} does not match dtype {dtype} shape "
                        f"{list(shape)}; the file is corrupt")
    return info


def _too_many_elements(shape) -> bool:
    """The element count, multiplied out dimension by dimension as safetensors does, passes 2^63 - 1 at some step
    (safetensors refuses a file whose count overflows its 64-bit integers even when a later dimension is 0)."""
    n = 1
    for d in shape:
        n *= d
        if n > _MAX_COUNT:
            return True
    return False


_MAX_COUNT = 2 ** 63 - 1


def _check_coverage(path: Path, infos, data_start: int, data_len: int) -> None:
    """The tensors tile the data area exactly: no two share a byte, and sorted by offset each begins where the
    previous ended, the last at the end of the file."""
    ordered = sorted(infos, key=lambda t: (t.start, t.nbytes))
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.start + a.nbytes:
            raise UserError(f"{path}: tensors {a.name!r} and {b.name!r} share bytes (overlapping data_offsets); "
                            f"safetensors refuses aliased tensors — the file is corrupt, re-save it")
    at = 0
    for t in ordered:
        begin = t.start - data_start
        if begin > at:
            raise UserError(f"{path}: {begin - at} bytes before tensor {t.name!r} belong to no tensor; the file is "
                            f"corrupt (safetensors refuses gaps) — re-save it")
        at = begin + t.nbytes
        if at > data_len:
            raise UserError(f"{path}: truncated: tensor {t.name!r} needs bytes up to {data_start + at}, the file has "
                            f"{data_start + data_len}; re-download or re-save the checkpoint")
    if at < data_len:
        raise UserError(f"{path}: {data_len - at} bytes after the last tensor belong to no tensor (appended "
                        f"data); safetensors refuses the file — re-save it")


class _OpenFiles:
    """Read descriptors kept open per file (one os.open per shard, not per tensor: a DeepSeek-V3-sized job reads
    ~130k small tensors for its value checks and copies 170k). pread, not mmap: a file truncated under us gives a
    short read (a clear error), not SIGBUS. Valid within one operation: build, plan and verify call `forget_open_files`
    when they start, so a file replaced between two operations of one process is opened afresh."""

    def __init__(self, keep: int = 16):
        self.keep, self.fds = keep, {}

    def fd(self, path: Path) -> int:
        fd = self.fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.fds) >= self.keep:
                os.close(self.fds.pop(next(iter(self.fds))))
        self.fds[path] = fd  # most recently used last
        return fd

    def forget(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


_OPEN = _OpenFiles()


def forget_open_files() -> None:
    """Start an operation afresh: close the shared descriptors, and let the kernel copy try again (an earlier output
    on another filesystem switched it off)."""
    _OPEN.forget()
    _KERNEL.reset()


def _truncated(t: TensorInfo) -> str:
    return f"{t.file}: truncated while reading tensor {t.name!r}; re-download the checkpoint"


def small_bytes(t: TensorInfo) -> bytes:
    """A (small) tensor's bytes in one read through the shared descriptors."""
    b = os.pread(_OPEN.fd(t.file), t.nbytes, t.start)
    if len(b) != t.nbytes:
        raise UserError(_truncated(t))
    return b


_NUMPY = {"U8": "<u1", "I8": "<i1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8",
          "U64": "<u8", "F16": "<f2", "F32": "<f4", "F64": "<f8", "BOOL": "?"}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype load_array gives a tensor of this (non-float) safetensors dtype."""
    return np.dtype(_NUMPY[dtype])


def load_array(t: TensorInfo) -> np.ndarray:
    """A small tensor as a numpy array, floats widened to float32 (BF16 by its bits; numpy has no bfloat16): what
    the value checks read, without torch. FP8 tensors are never value-checked this way."""
    return _as_array(t, small_bytes(t))


NEAR = 64 * 1024  # tensors this close in one file are read together: copying 64 KiB between them from the page
# cache costs about what one more read does here (a syscall and the Python around it: 4-5 µs), while reading past big
# tensors (a real model's qweight between its g_idx and scales) would cost more. Planning's value checks of the
# 60-layer V3-shaped job, whose experts' scales and zeros lie a few KiB apart: 0.75 → 0.69 s (NEAR 4 KiB → 64 KiB).
SPAN = 8 * 1024 * 1024  # the most one batched read holds


def load_stacked(groups: list[list[TensorInfo]]) -> list[np.ndarray]:
    """Each group — small tensors of one dtype and shape — as one array stacked on a new first axis (what
    np.stack of each one's load_array gives). Every group's tensors are read together: runs of neighbours in one
    file (gaps of at most NEAR, at most SPAN bytes) at once, each run's tensors gathered out of it by numpy indexing,
    group by group. A DeepSeek-V3-sized job value-checks 126k tensors of a few hundred bytes: a pread, a Python
    loop step or a numpy array per tensor each cost more than the checks."""
    for k, group in enumerate(groups):
        first = group[0]
        if any(t.dtype != first.dtype or t.shape != first.shape for t in group):
            raise ValueError(f"load_stacked: group {k} mixes dtypes or shapes")
    sizes = [group[0].nbytes for group in groups]
    out = [np.empty((len(group), n), np.uint8) for group, n in zip(groups, sizes)]
    flat = [t for group in groups for t in group]
    if flat:
        counts = [len(group) for group in groups]
        group_of = np.repeat(np.arange(len(groups)), counts)
        row_of = np.concatenate([np.arange(n) for n in counts])
        start = np.fromiter(map(_START, flat), np.int64, len(flat))
        end = start + np.repeat(np.array(sizes, np.int64), counts)
        file_of = np.fromiter(map(id, map(_FILE, flat)), np.int64, len(flat))  # one header's tensors share a Path
        order = np.lexsort((start, file_of))
        for i, j in _read_runs(start[order], end[order], file_of[order], SPAN):
            run = order[i:j]
            lo, hi = int(start[run[0]]), int(end[run].max())
            raw = os.pread(_OPEN.fd(flat[run[0]].file), hi - lo, lo)
            if len(raw) != hi - lo:
                short = run[end[run] > lo + len(raw)]
                raise UserError(_truncated(flat[short[0]]))
            data = np.frombuffer(raw, np.uint8)
            # the groups present, ascending (np.unique would import numpy.ma: 60 ms of CPU)
            for k in np.flatnonzero(np.bincount(group_of[run])):
                mine = run[group_of[run] == k]
                out[k][row_of[mine]] = data[(start[mine] - lo)[:, None] + np.arange(sizes[k])]
    return [_as_array(group[0], a, len(group)) for group, a in zip(groups, out)]


def _read_runs(start: np.ndarray, end: np.ndarray, file: np.ndarray, span: int) -> Iterator[tuple[int, int]]:
    """[i, j) ranges of tensors sorted by (file, start), each read at once: neighbours in one file (`file`: an id per
    tensor) with gaps of at most NEAR, at most `span` bytes from the first one's start to the furthest end (a tensor
    larger than that alone). The one rule for batched reads: value checks (load_stacked) and hashing (_runs)."""
    reach = np.empty_like(end)  # the furthest end so far, file by file
    new_file = np.flatnonzero(file[1:] != file[:-1]) + 1
    for a, b in zip([0, *new_file], [*new_file, len(start)]):
        reach[a:b] = np.maximum.accumulate(end[a:b])
        gaps = np.flatnonzero(start[a + 1:b] - reach[a:b - 1] > NEAR) + a + 1
        for i, stop in zip([a, *gaps], [*gaps, b]):
            while i < stop:  # split a long run of neighbours at SPAN
                j = max(i + 1, i + int(np.searchsorted(reach[i:stop], start[i] + span, side="right")))
                yield i, j
                i = j


def _runs(order: list[TensorInfo], span: int) -> Iterator[tuple[list[TensorInfo], int, int]]:
    """The runs of neighbours of `order` (sorted by file, then offset), as _read_runs cuts them — (tensors, lo, hi)."""
    n = len(order)
    start = np.fromiter(map(_START, order), np.int64, n)
    end = start + np.fromiter(map(_NBYTES, order), np.int64, n)
    for i, j in _read_runs(start, end, np.fromiter(map(id, map(_FILE, order)), np.int64, n), span):
        yield order[i:j], int(start[i]), int(end[i:j].max())


def _as_array(t: TensorInfo, raw, stacked: int | None = None) -> np.ndarray:
    """`raw` as `t`'s values (floats widened to float32); `stacked`: it holds that many such tensors, one after
    another, and the array gets a leading axis for them."""
    if t.dtype == "BF16":
        a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif t.dtype in _NUMPY:
        a = np.frombuffer(raw, _NUMPY[t.dtype])
        if t.dtype == "F16":
            a = a.astype(np.float32)
    else:
        raise ValueError(f"load_array: {t.dtype} has no numpy dtype")
    return a.reshape(t.shape if stacked is None else (stacked, *t.shape))


def iter_bytes(t: TensorInfo, chunk: int | None = None) -> Iterator[bytes]:
    """Stream a tensor's bytes from disk, `chunk` (CHUNK) at a time (memory stays bounded by it); a tensor of one
    chunk or less in one read through the shared descriptors."""
    chunk = chunk or CHUNK
    if t.nbytes <= chunk:
        yield small_bytes(t)
        return
    with open(t.file, "rb") as f:
        f.seek(t.start)
        left = t.nbytes
        while left:
            b = f.read(min(chunk, left))
            if not b:
                raise UserError(_truncated(t))
            left -= len(b)
            yield b


def iter_views(fd: int, start: int, nbytes: int, truncated: Callable[[], str]) -> Iterator[memoryview]:
    """Bytes [start, start + nbytes) of `fd`, READ_BUF at a time into one reused buffer, for consumers that use a
    chunk and let it go (hashing, scanning): each view is valid only until the next one is yielded. Reading into a
    fresh 16 MiB object per chunk cost more in page faults than the copy itself (sha256 of a 56 MB tensor 0.06 →
    0.04 s). A short file raises UserError(truncated())."""
    size = max(8, READ_BUF - READ_BUF % 8)  # whole values of every dtype in each buffer
    view = memoryview(bytearray(min(size, max(nbytes, 1))))
    at, end = start, start + nbytes
    while at < end:
        chunk = view[:min(len(view), end - at)]
        _fill(fd, chunk, at, truncated)  # whole buffers: a scan needs whole values
        yield chunk
        at += len(chunk)


def _fill(fd: int, view: memoryview, at: int, truncated: Callable[[], str]) -> None:
    """Exactly len(view) bytes of `fd` from `at` into `view`; a read comes back short only where the file ends:
    UserError(truncated())."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], at + got)
        if n == 0:
            raise UserError(truncated())
        got += n


def tensor_views(t: TensorInfo) -> Iterator[memoryview]:
    """iter_views of a source tensor, through the shared descriptors."""
    return iter_views(_OPEN.fd(t.file), t.start, t.nbytes, lambda: _truncated(t))


def same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Byte equality, read into two reused buffers and compared as bytearrays (memcmp; comparing memoryviews goes
    element by element, 100× slower), stopping at the first difference (cheaper than hashing both)."""
    if a.nbytes != b.nbytes:
        return False
    fds = (_OPEN.fd(a.file), _OPEN.fd(b.file))
    size = min(READ_BUF, max(a.nbytes, 1))
    bufs = (bytearray(size), bytearray(size))
    for at in range(0, a.nbytes, size):
        n = min(size, a.nbytes - at)
        if n < size:
            bufs = (bytearray(n), bytearray(n))
        for t, fd, buf in zip((a, b), fds, bufs):
            _fill(fd, memoryview(buf), t.start + at, lambda t=t: _truncated(t))
        if bufs[0] != bufs[1]:
            return False
    return True


def same_values(a: TensorInfo, b: TensorInfo) -> bool:
    """The same tensor: equal bytes, or the same values in another float dtype, each widened exactly (AWQ
    checkpoints store their unchanged norms as F16 beside a BF16 base)."""
    if a.dtype == b.dtype and same_bytes(a, b):
        return True
    return a.shape == b.shape and bool(np.array_equal(load_array(a), load_array(b)))


def offset_round_trip(a: TensorInfo, b: TensorInfo) -> bool:
    """Whether `a` holds `b`'s values after a round trip through (1 + value) in `b`'s dtype: what llm-compressor
    (0.14, modeling/offset_norm.py) writes for every norm of a model whose norms scale by (1 + weight) — Gemma's,
    Qwen3-Next's — converted to a plain norm for calibration and back, each step rounded to bfloat16: a Gemma 3's
    norms lose one unit in the last place in about half their values, with no modifier that changes norms at all."""
    if a.dtype != b.dtype or a.shape != b.shape or b.dtype not in _ROUNDED:
        return False
    rounded = _ROUNDED[b.dtype]
    return bool(np.array_equal(load_array(a), rounded(rounded(load_array(b) + np.float32(1)) - np.float32(1))))


def _round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32: torch's .to(torch.bfloat16)."""
    bits = x.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


_ROUNDED = {"BF16": _round_to_bf16, "F16": lambda x: x.astype(np.float16).astype(np.float32),
            "F32": lambda x: x}


def read_bytes(t: TensorInfo) -> bytes:
    return b"".join(iter_bytes(t))


def sha256_of(t: TensorInfo) -> str:
    h = hashlib.sha256()
    for b in tensor_views(t):
        h.update(b)
    return h.hexdigest()


# Float dtypes as raw words: (numpy view, exponent mask). A value is NaN or infinite when its exponent bits are all
# ones; E4M3 (no infinities) is NaN only as S.1111.111, checked apart.
_NONFINITE = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
              "F64": (np.uint64, 0x7FF0000000000000), "F8_E5M2": (np.uint8, 0x7C)}


_FLOAT_WORDS = frozenset(_NONFINITE) | {"F8_E4M3"}


def has_nonfinite(dtype: str, chunk: bytes) -> bool:
    """Whether a chunk of raw little-endian values of `dtype` holds a NaN or an infinity (integers never do)."""
    if dtype == "F8_E4M3":
        return bool(((np.frombuffer(chunk, np.uint8) & 0x7F) == 0x7F).any())
    if dtype not in _NONFINITE:
        return False
    view, exp = _NONFINITE[dtype]
    words = np.frombuffer(chunk, view)
    return bool(((words & view(exp)) == view(exp)).any())


def digest_and_scan(t: TensorInfo) -> tuple[str, bool]:
    """sha256 of a tensor's bytes, and whether any of its values is NaN or infinite — in one read."""
    return _digest_and_scan_views(t, tensor_views(t))


def _digest_and_scan_views(t: TensorInfo, views: Iterable[memoryview]) -> tuple[str, bool]:
    h, bad = hashlib.sha256(), False
    for b in views:
        h.update(b)
        bad = bad or has_nonfinite(t.dtype, b)
    return h.hexdigest(), bad


def digest_and_scan_many(ts: list[TensorInfo], workers: int | None = None) -> Iterator[tuple[TensorInfo, str, bool]]:
    """digest_and_scan of many tensors, one at a time (digest_and_scan_batches, unbatched)."""
    return chain.from_iterable(digest_and_scan_batches(ts, workers))


def digest_and_scan_batches(ts: list[TensorInfo], workers: int | None = None
                            ) -> Iterator[list[tuple[TensorInfo, str, bool]]]:
    """digest_and_scan of many tensors, in file and offset order, a list per job. Each job is a run of neighbours (at
    most HASH_SPAN bytes) read at once and hashed slice by slice — verify of a DeepSeek-V3-sized job hashes 171k
    tensors of 3.4 KB on average, where one read each cost more than the hashing — or one larger tensor streamed.
    The larger tensors go to `workers` threads (default: one per CPU, at most HASH_WORKERS; sha256, reads and numpy's
    scans release the GIL, so a model of large tensors hashes on every core where `sha256sum` uses one); the runs of
    small ones are hashed here, in turn: a 3 KB hash gives the GIL back for microseconds between Python steps, and two
    threads taking turns at it cost 40 % more CPU than one (the V3-shaped job: 2.05 s against 1.46 s). A job opens its
    own descriptor: the shared ones are one thread's."""
    jobs: list[tuple[list[TensorInfo], int, int | None]] = []
    by_file: dict[Path, list[TensorInfo]] = {}
    for t in ts:
        by_file.setdefault(t.file, []).append(t)
    for order in by_file.values():
        order.sort(key=_START)  # in header order already, for every writer we know: a linear pass
        small: list[TensorInfo] = []
        for t in order + [None]:  # tensors over HASH_SPAN streamed alone, in their place
            if t is not None and t.nbytes <= HASH_SPAN:
                small.append(t)
                continue
            jobs.extend(_runs(small, HASH_SPAN))
            small = []
            if t is not None:
                jobs.append(([t], t.start, None))
    pool = ThreadPoolExecutor(workers or hash_workers(), thread_name_prefix="mpconvert-hash")
    try:
        large = [pool.submit(_digest_job, job) if job[2] is None else None for job in jobs]
        for job, future in zip(jobs, large):  # in job order (each job's buffer is freed once it is hashed)
            yield _digest_job(job) if future is None else future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # an error (a truncated file) stops the jobs not yet started


HASH_WORKERS = 8  # past this, reading is the limit on the disks we know
HASH_SPAN = 4 * 1024 * 1024  # one job's batched read: with its NaN scan's temporaries, ~20 MB a thread (at 16 MiB,
# two threads took a 60-layer V3-shaped verify's peak RSS from 0.44 to 0.52 GiB)


def hash_workers() -> int:
    return min(HASH_WORKERS, usable_cores())


def _digest_job(job: tuple[list[TensorInfo], int, int | None]) -> list[tuple[TensorInfo, str, bool]]:
    run, lo, hi = job
    fd = os.open(run[0].file, os.O_RDONLY)
    try:
        if hi is None:  # one large tensor, streamed through this job's own descriptor
            t = run[0]
            return [(t, *_digest_and_scan_views(t, iter_views(fd, t.start, t.nbytes, lambda: _truncated(t))))]
        return _run_digests(fd, run, lo, hi)
    finally:
        os.close(fd)


def _run_digests(fd: int, run: list[TensorInfo], lo: int, hi: int) -> list[tuple[TensorInfo, str, bool]]:
    """sha256 of each tensor of a run of neighbours and whether it holds a NaN or an infinity, the run read at once.
    The slicing and hashing are iterated in C (maps), not a Python step per tensor: a DeepSeek-V3-sized verify hashes
    171k tensors of 3 KB, where the Python around each hash cost as much as the hash. Each float dtype's tensors are
    scanned as one joined buffer, one by one only where that finds a NaN or an infinity."""
    buf = memoryview(os.pread(fd, hi - lo, lo))
    n = len(run)
    at = np.fromiter(map(_START, run), np.int64, n) - lo
    end = at + np.fromiter(map(_NBYTES, run), np.int64, n)
    if n and int(end.max()) > len(buf):  # the file ends inside the run: name the first tensor it cuts
        raise UserError(_truncated(run[int(np.argmax(end > len(buf)))]))
    views = list(map(buf.__getitem__, map(slice, at.tolist(), end.tolist())))
    digests = list(map(_HEXDIGEST, map(hashlib.sha256, views)))
    dtypes = list(map(_DTYPE, run))
    bad: set[int] = set()
    for dtype in _FLOAT_WORDS.intersection(dtypes):
        mine = list(compress(range(n), map(dtype.__eq__, dtypes)))
        if has_nonfinite(dtype, b"".join(map(views.__getitem__, mine))):
            bad.update(i for i in mine if has_nonfinite(dtype, views[i]))
    return list(zip(run, digests, map(bad.__contains__, range(n)) if bad else repeat(False)))


_START, _FILE, _NBYTES, _DTYPE = (operator.attrgetter(a) for a in ("start", "file", "nbytes", "dtype"))
_HEXDIGEST = operator.methodcaller("hexdigest")
_TORCH_DTYPES = None


def torch_dtype(dtype: str):
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        import torch

        _TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
                         "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "F16": torch.float16,
                         "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64,
                         "F64": torch.float64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
    return _TORCH_DTYPES[dtype]


def load_tensor(t: TensorInfo):
    """Materialise one tensor (for numeric checks only; build never does this to copy)."""
    import torch

    buf = bytearray(read_bytes(t))
    if not buf:
        return torch.empty(t.shape, dtype=torch_dtype(t.dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(t.dtype)).reshape(t.shape)


def tensor_to_bytes(x) -> bytes:
    """Little-endian raw bytes of a CPU tensor or numpy array (a repacked tensor, an exact integer rewrite)."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
    import torch

    x = x.contiguous()
    if x.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):  # (no numpy dtype: their bits as ints)
        x = x.view(torch.uint8 if x.element_size() == 1 else torch.int16)
    return tensor_to_bytes(x.numpy())


@dataclass(slots=True)
class PendingTensor:
    """One tensor to write: the bytes of `src` verbatim, or else what `chunks()` yields (must total `nbytes`; each
    chunk an immutable `bytes`, as it may still be hashed while the next one is made)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterable[bytes]] | None = None
    src: TensorInfo | None = None


def header_bytes(tensors: list[PendingTensor], metadata: dict[str, str]) -> bytes:
    """The exact header for `tensors` in the given order, padded to 8 bytes (deterministic): what json.dumps with
    compact separators writes, entry by entry (a dict of 171k entries cost more than the rest of the header)."""
    parts = [json.dumps({"__metadata__": dict(sorted(metadata.items()))}, separators=(",", ":"))[:-1]]
    off = 0
    for t in tensors:
        parts.append(f'{_json_string(t.name)}:{{"dtype":{_json_string(t.dtype)},"shape":[{",".join(map(str, t.shape))}],'
                     f'"data_offsets":[{off},{off + t.nbytes}]}}')
        off += t.nbytes
    raw = (",".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _copy_run(tensors: list[PendingTensor], i: int) -> int:
    """The end of the run of small verbatim tensors from i that lie back to back in one source file (one read for
    all), at most CHUNK bytes; i when tensors[i] is not such a tensor (made here, or large: _copy_one copies it)."""
    first = tensors[i].src
    if first is None or _copied_alone(first):
        return i
    end, j = first.start + first.nbytes, i + 1
    while j < len(tensors):
        t = tensors[j].src
        if (t is None or t.start != end or t.file != first.file or _copied_alone(t)
                or end + t.nbytes - first.start > CHUNK):
            break
        end, j = end + t.nbytes, j + 1
    return j


def _copied_alone(t: TensorInfo) -> bool:
    return t.nbytes > CHUNK or (_KERNEL.on and t.nbytes >= KERNEL_COPY_MIN)


def _pwrite_all(fd: int, b, at: int) -> int:
    """Write all of `b` at offset `at`; returns the offset after it."""
    view = memoryview(b)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
    return at


class Hasher:
    """sha256 beside the I/O: hashing runs on the other core (hashlib releases the GIL) while the main thread copies,
    so a build of large tensors costs about max(copy, hash), not their sum. Two kinds of job share its two threads:
    a streamed tensor's buffers, one job in flight (memory bounded by two buffers, one sha256 object never fed twice
    at once), and whole tensors read back from the output after a kernel copy (each job holds one READ_BUF). The
    read-backs may trail the copy by up to READ_BACK_BYTES — enough for the copy to finish and the flush to start
    while the last tensors are hashed, little enough that what they read is still in the page cache. One Hasher may
    serve several files (the writer's shards): digests are complete after wait(). Jobs under OVERLAP bytes run
    inline (a thread hop costs more than hashing a few KB). A context manager: leaving it lets the threads go."""

    OVERLAP = 1 << 20
    READ_BACK_BYTES = 1 << 30

    def __init__(self):
        self._pool = None
        self._job = None
        self._read_backs: list = []  # (future, bytes), oldest first
        self._trailing = 0

    def __enter__(self) -> "Hasher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, fn: Callable[[], None]):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="mpconvert-sha256")
        return self._pool.submit(fn)

    def submit(self, fn: Callable[[], None], size: int) -> None:
        self._wait_streamed()
        if size < self.OVERLAP:
            fn()
        else:
            self._job = self._submit(fn)

    def submit_read_back(self, fn: Callable[[], None], size: int) -> None:
        if size < self.OVERLAP:
            fn()
            return
        while self._read_backs and self._trailing + size > self.READ_BACK_BYTES:
            self._wait_oldest()
        self._read_backs.append((self._submit(fn), size))
        self._trailing += size

    def _wait_oldest(self) -> None:
        job, size = self._read_backs.pop(0)
        self._trailing -= size
        job.result()

    def _wait_streamed(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            job.result()

    def wait(self) -> None:
        self._wait_streamed()
        while self._read_backs:
            self._wait_oldest()

    def close(self) -> None:
        """Let the threads go: jobs not started are dropped (after wait() there are none; on an error or Ctrl-C the
        build is abandoned), running ones end first. A job's error was already raised by wait(), or gives way to the
        one being raised."""
        self._job, self._read_backs, self._trailing = None, [], 0
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _digest_slices(buf: memoryview, spans: list[tuple[str, int, int]], into: dict[str, str]) -> Callable[[], None]:
    def run():
        for name, at, n in spans:
            into[name] = hashlib.sha256(buf[at:at + n]).hexdigest()
    return run


def _digest_read_back(path: Path, name: str, at: int, n: int, into: dict[str, str]) -> Callable[[], None]:
    """sha256 of bytes already in the output file, read back (from the page cache: just written) through a
    descriptor of its own (the writer's may be closed by the time a trailing job runs)."""
    def run():
        h, fd = hashlib.sha256(), os.open(path, os.O_RDONLY)
        try:
            for b in iter_views(fd, at, n, lambda: f"tensor {name!r}: its copy in {path} is shorter than planned; "
                                                   f"rebuild"):
                h.update(b)
        finally:
            os.close(fd)
        into[name] = h.hexdigest()
    return run


class _KernelCopy:
    """Verbatim bytes copied file to file inside the kernel (copy_file_range: no trip through user space, and on
    filesystems that share extents — XFS, Btrfs — no data copy at all), as `cp` does. Where the kernel or the
    filesystems cannot (another filesystem: Linux 6.x refuses a copy from ext4 to tmpfs; an old kernel), the first
    refusal switches it off for the operation and the bytes go through read and write instead."""

    REFUSALS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.ETXTBSY}

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """On where the platform has it (forget_open_files calls this as each operation starts)."""
        self.on = hasattr(os, "copy_file_range")

    PIECE = 64 << 20  # per call: progress moves during a tensor of gigabytes (DeepSeek-V3's embedding is 1.85 GB)

    def copy(self, t: TensorInfo, out: int, at: int, progress: Callable[[int], None]) -> bool:
        """t's bytes to `out` at offset `at`; False (nothing copied) where the kernel refuses."""
        src, done = _OPEN.fd(t.file), 0
        while done < t.nbytes:
            try:
                n = os.copy_file_range(src, out, min(self.PIECE, t.nbytes - done), t.start + done, at + done)
            except OSError as e:
                if done == 0 and e.errno in self.REFUSALS:
                    self.on = False
                    return False
                raise
            if n == 0:
                if done == 0 and os.fstat(src).st_size >= t.start + t.nbytes:
                    self.on = False  # nothing copied from a file that holds the bytes: a filesystem that does not
                    return False     # implement it (as coreutils' cp, take read and write)
                raise UserError(f"{t.file}: truncated while reading tensor {t.name!r}; the source changed or is "
                                f"truncated")
            done += n
            progress(n)
        return True


_KERNEL = _KernelCopy()


def write_file(path: Path, tensors: list[PendingTensor], metadata: dict[str, str],
               on_bytes: Callable[[int], None] = lambda n: None, hasher: Hasher | None = None,
               digests: dict[str, str] | None = None) -> dict[str, str]:
    """Write one safetensors file; returns the sha256 of every tensor as it lies in the file (into `digests` when
    given). Memory stays bounded by a few CHUNKs: the header is known up front (sizes are planned); verbatim tensors
    lying back to back in a source are read, hashed and written together (a DeepSeek-V3-sized job has 171k tensors of
    3.4 KB on average: per-tensor reads and writes were most of its build); a large verbatim tensor is copied in the
    kernel and hashed as read back; the rest stream chunk by chunk. Hashing overlaps the copying (Hasher): with the
    caller's `hasher`, the digests are complete only after its wait() — the caller may flush this file meanwhile;
    without, before this returns. Progress is reported every few MB, not per tensor. Not flushed to disk here: the
    caller does (safety.fsync_tree)."""
    digests = {} if digests is None else digests
    if hasher is None:
        with Hasher() as own:
            write_file(path, tensors, metadata, on_bytes, own, digests)
            own.wait()
        return digests
    progress = _Progress(on_bytes)
    out = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        at = _pwrite_all(out, header_bytes(tensors, metadata), 0)
        i = 0
        while i < len(tensors):
            j = _copy_run(tensors, i)
            if j > i:
                written = _copy_neighbours(out, at, tensors[i:j], hasher, digests)
                progress.add(written)
                i = j
            else:
                written = _copy_one(path, out, at, tensors[i], hasher, digests, progress.add)
                i += 1
            at += written
    finally:
        os.close(out)
    progress.flush()
    return digests


class _Progress:
    """Bytes written, passed on every 4 MiB or so, not per tensor (171k rich updates cost seconds)."""

    EVERY = 1 << 22

    def __init__(self, on_bytes: Callable[[int], None]):
        self.on_bytes, self.pending = on_bytes, 0

    def add(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.EVERY:
            self.flush()

    def flush(self) -> None:
        self.on_bytes(self.pending)
        self.pending = 0


def _copy_neighbours(out: int, at: int, run: list[PendingTensor], hasher: Hasher, digests: dict[str, str]) -> int:
    """Verbatim tensors back to back in one source file: one read, one write, a digest per tensor."""
    first, last = run[0].src, run[-1].src
    want = last.start + last.nbytes - first.start
    buf = memoryview(os.pread(_OPEN.fd(first.file), want, first.start))
    if len(buf) != want:
        raise UserError(f"{first.file}: truncated while reading tensor {first.name!r}; the source changed or is "
                        f"truncated")
    hasher.submit(_digest_slices(buf, [(t.name, t.src.start - first.start, t.nbytes) for t in run], digests), want)
    _pwrite_all(out, buf, at)
    return want


def _copy_one(path: Path, out: int, at: int, t: PendingTensor, hasher: Hasher, digests: dict[str, str],
              progress: Callable[[int], None]) -> int:
    """One tensor: a large verbatim one copied in the kernel, else (made or rewritten here, or where the kernel
    cannot copy) streamed chunk by chunk."""
    if t.src is not None and _KERNEL.on and _KERNEL.copy(t.src, out, at, progress):
        hasher.submit_read_back(_digest_read_back(path, t.name, at, t.nbytes, digests), t.nbytes)
        return t.nbytes
    h, written = hashlib.sha256(), 0
    for b in (iter_bytes(t.src) if t.src is not None else t.chunks()):
        hasher.submit(lambda b=b: h.update(b), len(b))
        _pwrite_all(out, b, at + written)
        written += len(b)
        progress(len(b))
    hasher.submit(lambda: digests.__setitem__(t.name, h.hexdigest()), 0)
    if written != t.nbytes:
        raise UserError(f"tensor {t.name!r}: expected {t.nbytes} bytes, the source gave {written}; the source "
                        f"changed or is truncated")
    return written
