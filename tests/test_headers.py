"""safetensors headers read without json.loads when they are in the canonical layout (safetensors_io._canonical_header):
for every header — canonical, valid but laid out otherwise, and malformed in ways that touch the fast path's own
reasoning — the result must be exactly what the full JSON path gives: the same tensors, or the same refusal."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mpconvert import safetensors_io
from mpconvert.errors import UserError
from mpconvert.safetensors_io import read_header

ENTRY_A = '"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}'
ENTRY_B = '"b.bias":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]}'
META = '"__metadata__":{"format":"pt"}'

HEADERS = {
    "canonical": "{" + ENTRY_A + "," + ENTRY_B + "}",
    "canonical with metadata": "{" + META + "," + ENTRY_A + "," + ENTRY_B + "}",
    "metadata only, no tensors": "{" + META + "}",
    "metadata with an escaped quote and a brace": '{"__metadata__":{"note":"a \\"}\\" b"},' + ENTRY_A + "," + ENTRY_B + "}",
    "metadata at the end": "{" + ENTRY_A + "," + ENTRY_B + "," + META + "}",
    "spaces after commas": "{" + ENTRY_A + ", " + ENTRY_B + "}",
    "entries reordered keys": '{"a.weight":{"shape":[2,2],"dtype":"F32","data_offsets":[0,16]},' + ENTRY_B + "}",
    "a name twice": "{" + ENTRY_A + "," + ENTRY_A.replace("[0,16]", "[16,24]").replace("[2,2]", "[2]") + "}",
    "metadata twice in its object": '{"__metadata__":{"format":"pt","format":"np"},' + ENTRY_A + "," + ENTRY_B + "}",
    "metadata not strings": '{"__metadata__":{"format":1},' + ENTRY_A + "," + ENTRY_B + "}",
    "a tensor called __metadata__": "{" + ENTRY_A + "," + ENTRY_B.replace("b.bias", "__metadata__") + "}",
    "two commas": "{" + ENTRY_A + ",," + ENTRY_B + "}",
    "garbage after the object": "{" + ENTRY_A + "," + ENTRY_B + "}x",
    "no closing brace": "{" + ENTRY_A + "," + ENTRY_B,
    "offsets not tiling": "{" + ENTRY_A + "," + ENTRY_B.replace("[16,24]", "[17,25]") + "}",
    "bytes after the last tensor": "{" + ENTRY_A + "," + ENTRY_B.replace("[16,24]", "[16,22]").replace("[4]", "[3]")
                                   + "}",
    "shape against bytes": "{" + ENTRY_A.replace("[2,2]", "[2,3]") + "," + ENTRY_B + "}",
}


def write(path, header: str) -> None:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(24))


def outcome(path):
    try:
        tensors, _ = read_header(path)
        return sorted((t.name, t.dtype, t.shape, t.start, t.nbytes) for t in tensors.values())
    except UserError as e:
        return f"error: {e}"


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_the_fast_path_agrees_with_the_json_path(case, tmp_path, monkeypatch):
    f = tmp_path / "m.safetensors"
    write(f, HEADERS[case])
    fast = outcome(f)
    monkeypatch.setattr(safetensors_io, "_canonical_header", lambda raw: None)
    assert fast == outcome(f)


def test_the_fast_path_is_taken_for_what_the_writers_write(tmp_path, monkeypatch):
    """safetensors' own writer and mpconvert's lay headers out canonically: json.loads is not called for them."""
    f = tmp_path / "m.safetensors"
    save_file({"x.weight": torch.zeros(3, 5), "x.qweight": torch.zeros(2, dtype=torch.int32)}, str(f),
              metadata={"format": "pt"})
    calls = []
    real = json.loads
    monkeypatch.setattr(safetensors_io.json, "loads", lambda *a, **k: calls.append(1) or real(*a, **k))
    tensors, _ = read_header(f)
    assert sorted(tensors) == ["x.qweight", "x.weight"] and calls == []
