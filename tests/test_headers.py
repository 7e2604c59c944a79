"""safetensors headers read without json.loads when they are in the canonical layout (safetensors_io._canonical_header):
for every header — canonical, valid but laid out otherwise, and malformed in ways that touch the fast path's own
reasoning — the result must be exactly what the full JSON path gives: the same tensors, or the same refusal."""
from __future__ import annotations

import json
import random
import re
import struct

import pytest
import torch
from safetensors import safe_open
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
    "a dtype safetensors lacks": "{" + ENTRY_A + "," + ENTRY_B.replace("BF16", "BF17") + "}",
    "a dtype no format stores": "{" + ENTRY_A + "," + ENTRY_B.replace("BF16", "F8_E8M0") + "}",
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


@pytest.mark.parametrize("dtype,message", [
    ("BF17", "tensor 'b.bias' has dtype 'BF17', which is not a safetensors dtype; the file is corrupt — re-download or "
             "re-save it"),
    ("F8_E8M0", "tensor 'b.bias' has dtype F8_E8M0 (an MX block scale), which none of the formats mpconvert mixes "
                "stores (they use BOOL, U8, "),
    ("F4", "tensor 'b.bias' has dtype F4 (a 4-bit float, two per byte), which none of the formats"),
])
def test_an_unknown_dtype_says_what_it_is_and_the_fix(tmp_path, dtype, message):
    """A dtype outside the safetensors format is a corrupt file; one the format defines (0.7: sub-byte floats, MX
    scales, complex) but no mixed format stores is a checkpoint in an unsupported format — each said with its fix (it
    was 'has unsupported dtype', no fix)."""
    f = tmp_path / "m.safetensors"
    write(f, "{" + ENTRY_A + "," + ENTRY_B.replace("BF16", dtype) + "}")
    with pytest.raises(UserError, match=re.escape(f"{f}: {message}")):
        read_header(f)


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


# ---- randomized: headers mutated the way corrupt or hand-made files are ------------------------------------------
TOKENS = ["0", "00", "01", "007", "-1", "1e2", "1.0", "", ",", ",,", " ", "[", "]", "{", "}", '"', ":", "null",
          "true", "__metadata__", "F32", "I8", "F4", "x.y", "é", "\\u0041", "\\n", "99999999999999999999",
          "9223372036854775808", "18446744073709551616", "[0,0]", "[]", '"dtype"', '"shape"']
DTYPES = ["F32", "BF16", "I8", "I32", "U8", "F8_E4M3", "F64"]


def random_header(rng) -> tuple[str, int]:
    """A valid header (sometimes laid out as json.dumps does with spaces, or keys shuffled) and its data length."""
    entries, at = [], 0
    for i in range(rng.randint(1, 4)):
        dtype = rng.choice(DTYPES)
        shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        n = safetensors_io.nbytes_of(dtype, shape)
        name = rng.choice(["model.layers.0.mlp.down_proj.weight", f"t{i}.qweight", f"m.{i}.weight_scale", "a/b:c+d"])
        entries.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}))
        at += n
    rng.shuffle(entries)
    if rng.random() < 0.5:
        entries.insert(rng.randint(0, len(entries)), ("__metadata__", {"format": "pt"}))
    style = rng.random()
    if style < 0.7:  # the canonical layout every writer uses
        text = "{" + ",".join(json.dumps(k) + ":" + json.dumps(v, separators=(",", ":")) for k, v in entries) + "}"
    elif style < 0.85:
        text = json.dumps(dict(entries))
    else:
        text = "{" + ",".join(json.dumps(k) + ":" + json.dumps(dict(rng.sample(sorted(v.items()), len(v))),
                                                                 separators=(",", ":")) for k, v in entries) + "}"
    return text, at


def mutate(text: str, rng) -> str:
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        i = rng.randint(0, len(text))
        roll = rng.random()
        if roll < 0.4:  # replace one token (a number, a string, a punctuation mark)
            spans = [m.span() for m in re.finditer(r'[0-9]+|"[^"]*"|[\[\]{},:]', text)]
            a, b = rng.choice(spans)
            text = text[:a] + rng.choice(TOKENS) + text[b:]
        elif roll < 0.7:
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        else:
            text = text[:i] + text[i + rng.randint(1, 3):]
    return text


def test_mutated_headers_agree_with_the_reference_and_with_safetensors(tmp_path, monkeypatch):
    """2,000 random valid and mutated headers: the fast paths (_canonical_header, and the canonical-entry shortcut after
    json.loads) give exactly what the reference gives — json.loads and the entry-by-entry checks alone, the same
    tensors or the same refusal, never an exception other than UserError — and whatever mpconvert accepts, the
    official safetensors library opens with the same names, dtypes and shapes."""
    rng = random.Random(20261204)
    f = tmp_path / "m.safetensors"
    accepted = refused = 0
    for case in range(2000):
        text, data_len = random_header(rng)
        text = mutate(text, rng)
        raw = text.encode()
        raw += b" " * (-len(raw) % 8)
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
        fast = outcome(f)
        with monkeypatch.context() as m:
            m.setattr(safetensors_io, "_canonical_header", lambda raw: None)
            m.setattr(safetensors_io, "_ENTRY", re.compile(rb"(?!)"))  # no canonical-entry shortcut either
            reference = outcome(f)
        assert fast == reference, (case, text)
        if isinstance(fast, str):
            refused += 1
            continue
        accepted += 1
        with safe_open(str(f), "np") as st:
            theirs = sorted((k, st.get_slice(k).get_dtype(), tuple(st.get_slice(k).get_shape())) for k in st.keys())
        assert theirs == [(name, dtype, shape) for name, dtype, shape, _, _ in fast], (case, text)
    assert accepted > 250 and refused > 1000  # both well represented (363 and 1,637 with this seed)
