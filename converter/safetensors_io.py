"""The safetensors container: a lazy reader that parses headers only, and a streaming writer.

We parse the header ourselves (8-byte little-endian length + JSON) instead of going through a framework so that
build can copy tensor bytes verbatim with bounded memory, and so that a truncated or hostile file is rejected with a
precise message before any byte is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import UserError

DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own cap
CHUNK = 16 * 1024 * 1024  # copy granularity: bounds memory per tensor, large enough for full disk speed


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live. `start` is absolute in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], bytes]:
    """Parse and validate one .safetensors header. Returns tensors and the raw header bytes (for fingerprints)."""
    try:
        size = path.stat().st_size
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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: header is not a JSON object; the file is corrupt")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = meta["dtype"], tuple(int(x) for x in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has a malformed header entry; the file is corrupt") from None
        if dtype not in DTYPE_SIZE:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, path, data_start + b, e - b)
        if e < b or info.nbytes != info.numel * DTYPE_SIZE[dtype]:
            raise UserError(f"{path}: tensor {name!r} byte range {b}..{e} does not match dtype {dtype} shape "
                            f"{list(shape)}; the file is corrupt")
        if data_start + e > size:
            raise UserError(f"{path}: truncated: tensor {name!r} needs bytes up to {data_start + e}, the file has "
                            f"{size}; re-download or re-save the checkpoint")
        out[name] = info
    return out, raw


def iter_bytes(t: TensorInfo, chunk: int = CHUNK) -> Iterator[bytes]:
    """Stream a tensor's bytes from disk, `chunk` at a time (memory stays bounded by `chunk`)."""
    with open(t.file, "rb") as f:
        f.seek(t.start)
        left = t.nbytes
        while left:
            b = f.read(min(chunk, left))
            if not b:
                raise UserError(f"{t.file}: truncated while reading tensor {t.name!r}; re-download the checkpoint")
            left -= len(b)
            yield b


def same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Byte equality, streamed, stopping at the first difference (cheaper than hashing both)."""
    if a.nbytes != b.nbytes:
        return False
    return all(x == y for x, y in zip(iter_bytes(a), iter_bytes(b)))


def read_bytes(t: TensorInfo) -> bytes:
    return b"".join(iter_bytes(t))


def sha256_of(t: TensorInfo) -> str:
    h = hashlib.sha256()
    for b in iter_bytes(t):
        h.update(b)
    return h.hexdigest()


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
    """Little-endian raw bytes of a contiguous CPU tensor (for the few exact integer rewrites, e.g. GPTQ v2→v1)."""
    import torch

    x = x.contiguous()
    if x.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        x = x.view(torch.uint8 if x.element_size() == 1 else torch.int16)
    return np.ascontiguousarray(x.numpy()).astype(x.numpy().dtype.newbyteorder("<"), copy=False).tobytes()


@dataclass
class PendingTensor:
    """One tensor to write: its bytes come from `chunks()` and must total `nbytes`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterable[bytes]]


def header_bytes(tensors: list[PendingTensor], metadata: dict[str, str]) -> bytes:
    """The exact header for `tensors` in the given order, padded to 8 bytes (deterministic)."""
    h: dict = {"__metadata__": dict(sorted(metadata.items()))}
    off = 0
    for t in tensors:
        h[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: Path, tensors: list[PendingTensor], metadata: dict[str, str],
               on_bytes: Callable[[int], None] = lambda n: None) -> dict[str, str]:
    """Write one safetensors file by streaming each tensor's chunks; returns sha256 per tensor.

    The header is known up front (sizes are planned), so nothing is buffered beyond one chunk."""
    digests: dict[str, str] = {}
    with open(path, "wb") as f:
        f.write(header_bytes(tensors, metadata))
        for t in tensors:
            h = hashlib.sha256()
            written = 0
            for b in t.chunks():
                h.update(b)
                f.write(b)
                written += len(b)
                on_bytes(len(b))
            if written != t.nbytes:
                raise UserError(f"tensor {t.name!r}: expected {t.nbytes} bytes, the source gave {written}; "
                                f"the source changed or is truncated")
            digests[t.name] = h.hexdigest()
        f.flush()
        os.fsync(f.fileno())
    return digests
