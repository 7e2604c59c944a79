"""Inputs nobody tuned to, seeded: random edits of real sources (safetensors headers, bytes, lengths, producer and
model configs) and of the recipe, each built through the CLI. Every build either succeeds — and its output then
verifies — or is refused with one `error:` line and exit 2; never a traceback, never a half-written output, never a
changed source. And random edits of an output's JSON files (config, index, manifest — re-signed too): verify
reports or passes, inspect reads or refuses in one line, never an internal error. (verify's side of the same class,
corruption by corruption, is test_sweep.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from helpers import copy, header_of, put_header, write_recipe

SOURCES = {"fp8": "ct-fp8-static", "int8": "ct-w8a8", "gptq": "gptq"}
RULES = '''- {match: "self_attn.*", layers: 0, source: fp8}
- {match: mlp.down_proj, source: int8}
- {match: lm_head, source: base}'''
CASES = 200  # builds of this size take ~50 ms in-process: a wide sweep costs seconds
WEIRD = [None, True, False, 0, -1, 1, 2**63, 2**70, 10**9, 10**12, 1.5, "", "x", "4", [], [1], [[1]], {}, {"a": 1},
         "F8_E4M3", "I4", "BF16", " BF16", "bf16", [0, -1], [2**40, 2**40], "../../etc/passwd", "\u0000", "ä"]


def tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(str(p.relative_to(d)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# ---- edits of one source ------------------------------------------------------------------------------------------
def edit_header(src: Path, rng: random.Random) -> str:
    f = src / "model.safetensors"
    h, data = header_of(f)
    name = rng.choice(sorted(k for k in h if k != "__metadata__"))
    e, kind = h[name], rng.choice(["dtype", "shape", "shape_dim", "offsets", "drop_field", "extra_field", "rename",
                                   "metadata", "drop_tensor", "shared_offsets", "same_size_dtype"])
    if kind == "dtype":
        e["dtype"] = rng.choice(WEIRD)
    elif kind == "shape":
        e["shape"] = rng.choice(WEIRD)
    elif kind == "shape_dim" and e["shape"]:
        i = rng.randrange(len(e["shape"]))
        e["shape"][i] = rng.choice([0, -1, e["shape"][i] * 2, e["shape"][i] // 2, 1.0, "3", None, True])
    elif kind == "offsets":
        a, b = e["data_offsets"]
        e["data_offsets"] = rng.choice(WEIRD + [[a, b + 2], [a + 1, b], [b, a], [a, b, b], [True, b]])
    elif kind == "drop_field":
        e.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif kind == "extra_field":
        e[rng.choice(["foo", "dtype2", ""])] = rng.choice(WEIRD)
    elif kind == "rename":
        h[rng.choice(["", "a" * 600, name + ".", name.upper(), "x/../y", name + " ",
                      "model.layers.99.mlp.up_proj.weight", name.rsplit(".", 1)[0] + ".weight_scale"])] = h.pop(name)
    elif kind == "metadata":
        h["__metadata__"] = rng.choice(WEIRD + [{"format": 1}, {"a": {"b": 1}}])
    elif kind == "drop_tensor":
        h.pop(name)
    elif kind == "shared_offsets":
        e["data_offsets"] = list(h[rng.choice(sorted(k for k in h if k != "__metadata__"))]["data_offsets"])
    else:
        e["dtype"] = {"BF16": "F16", "F16": "BF16", "I32": "F32", "F32": "I32", "I8": "U8", "U8": "I8",
                      "F8_E4M3": "I8", "I64": "F64"}.get(e["dtype"], "F32")
    put_header(f, h, data)
    return f"header {kind} of {name}"


def flip_header_bytes(src: Path, rng: random.Random) -> str:
    f = src / "model.safetensors"
    b = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", b[:8])
    for _ in range(rng.randint(1, 3)):
        b[rng.randrange(0, 8 + n)] = rng.randrange(256)
    f.write_bytes(bytes(b))
    return "header bytes flipped"


def truncate(src: Path, rng: random.Random) -> str:
    f = src / "model.safetensors"
    size = f.stat().st_size
    cut = rng.choice([0, 7, 8, 9, rng.randrange(size), size - 1])
    os.truncate(f, cut)
    return f"truncated to {cut} of {size} bytes"


def edit_json(src: Path, rng: random.Random) -> str:
    """One leaf of config.json (or GPTQ's quantize_config.json) set to a random value or dropped."""
    f = src / rng.choice([n for n in ("config.json", "quantize_config.json") if (src / n).exists()])
    doc = json.loads(f.read_text())
    cur, trail = doc, []
    while isinstance(cur, dict) and cur:
        k = rng.choice(sorted(cur))
        trail.append(k)
        if isinstance(cur[k], dict) and cur[k] and rng.random() < 0.6:
            cur = cur[k]
            continue
        if rng.random() < 0.3:
            cur.pop(k)
        else:
            cur[k] = rng.choice(WEIRD)
        break
    f.write_text(json.dumps(doc))
    return f"{f.name} {'.'.join(trail)} edited"


EDITS = [edit_header] * 4 + [flip_header_bytes, truncate, edit_json, edit_json]


def _refused_cleanly(r, out: Path) -> None:
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and "Traceback" not in r.output, r.output
    assert not out.exists() and not [p for p in out.parent.iterdir() if "mpconvert-" in p.name]


def test_random_edits_of_a_source(llama, cli, tmp_path):
    rng = random.Random(15)
    labels = ["base", *SOURCES]
    outcomes = {"built": 0, "refused": 0}
    for i in range(CASES):
        label = rng.choice(labels)
        kind = "base" if label == "base" else SOURCES[label]
        edited = copy(llama[kind], tmp_path / f"src{i}")
        what = rng.choice(EDITS)(edited, rng)
        before = tree_digest(edited)
        r = write_recipe(tmp_path, {**llama, "edited": edited},
                         {s: "edited" if s == label else k for s, k in SOURCES.items()}, "gptq", RULES)
        if label == "base":
            r.write_text(r.read_text().replace(f"base: {llama['base']}", f"base: {edited}"))
        out = tmp_path / f"out{i}"
        res = cli("build", r, "-o", out)
        assert tree_digest(edited) == before, f"case {i} ({label}: {what}) changed the source"
        if res.exit_code == 0:  # an edit the build did not need (an unused tensor's dtype, a config field)
            v = cli("verify", out)
            assert v.exit_code == 0, f"case {i} ({label}: {what}) built an output verify refuses:\n{v.output}"
            outcomes["built"] += 1
        else:
            _refused_cleanly(res, out)
            outcomes["refused"] += 1
        shutil.rmtree(edited)  # each case copies a source and may build: kept, the cases took half a GB of disk
        shutil.rmtree(out, ignore_errors=True)
    print(outcomes)
    assert outcomes["refused"] > CASES // 2


# ---- edits of the recipe ------------------------------------------------------------------------------------------
def edit_recipe(recipe: dict, rng: random.Random) -> str:
    where = rng.choice(["top", "source", "rule", "rule", "rule", "output", "new rule"])
    if where == "top":
        key = rng.choice(["base", "sources", "default", "rules", "output", "mtp", "extra"])
        recipe[key] = rng.choice(WEIRD)
        return f"{key} = {recipe[key]!r}"
    if where == "source":
        name = rng.choice([*recipe["sources"], "new", "base", "", " x"])
        recipe["sources"][name] = rng.choice(WEIRD + [recipe["base"], "~", "/", "/dev/null", "/proc/self"])
        return f"sources[{name!r}] = {recipe['sources'][name]!r}"
    if where == "output":
        recipe["output"] = {rng.choice(["shard_size", "layout"]): rng.choice(WEIRD + ["1MB", "0", "5GB", "1KiB"])}
        return f"output = {recipe['output']!r}"
    if where == "new rule":
        fields = rng.sample(["match", "layers", "source", "experts", "moe", "x"], rng.randint(1, 4))
        recipe["rules"].insert(0, {f: rng.choice(WEIRD + ["*", "re:((", "0-99999999", "3-1", "fp8"]) for f in fields})
        return f"rules[0] = {recipe['rules'][0]!r}"
    i = rng.randrange(len(recipe["rules"]))
    field = rng.choice(["match", "layers", "source", "experts", "moe"])
    recipe["rules"][i][field] = rng.choice(WEIRD + ["*", "re:.*", "0-1,", "fp8", "base"])
    return f"rules[{i}].{field} = {recipe['rules'][i][field]!r}"


MOE_SOURCES = {"fp8": "ct-fp8-block", "int8": "ct-w8a8", "gptq": "gptq"}
MOE_RULES = '''- {match: "self_attn.*", source: fp8}
- {match: "mlp.experts.*", experts: "0-3", source: int8}
- {match: "mlp.experts.*", layers: 1, experts: [4, "6-7"], source: fp8}'''


@pytest.mark.parametrize("model,seed", [("llama", 1), ("llama", 2), ("moe", 6)])
def test_random_edits_of_the_recipe(model, seed, llama, moe, cli, tmp_path):
    """A MoE recipe too: expert rules are where `experts: []` was an internal error."""
    rng = random.Random(seed)
    fixtures, sources, rules = (llama, SOURCES, RULES) if model == "llama" else (moe, MOE_SOURCES, MOE_RULES)
    pristine = yaml.safe_load(write_recipe(tmp_path, fixtures, sources, "gptq", rules).read_text())
    refused = 0
    for i in range(CASES // 2):
        recipe = json.loads(json.dumps(pristine))
        what = edit_recipe(recipe, rng)
        p = tmp_path / f"r{i}.yaml"
        p.write_text(yaml.safe_dump(recipe, allow_unicode=True))
        out = tmp_path / f"out{i}"
        res = cli("build", p, "-o", out)
        if res.exit_code == 0:
            assert cli("verify", out, "--fast").exit_code == 0, what
        else:
            _refused_cleanly(res, out)
            refused += 1
    assert refused > CASES // 4


# ---- edits of an output's JSON files -------------------------------------------------------------------------------
OUTPUT_EDITS = 1500
EXTREME_INTS = [-1, 0, 2**31, 2**32 + 1, 10**9, 2**63 - 1, 2**63, 2**64, -2**63]


def _walk(obj, rng) -> tuple:
    """A random place in the document: from the top, into a random child at each level, stopping on the way at
    random — each key of a level as likely as any other, so that a rare block (one module's rows) is reached as
    often as a long column."""
    at, node = (), obj
    while True:
        kids = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        if not kids or (at and rng.random() < 0.25):
            return at
        k = rng.choice(list(kids))
        at, node = at + (k,), node[k]


def mutate(obj, rng) -> str:
    """Replace or remove one value anywhere in the document (in place); what was done, for the failure message.
    An integer is replaced by an extreme integer half of the time (sizes and indexes past what the checks expect)."""
    at = _walk(obj, rng)
    if not at:
        return "nothing"
    parent = obj
    for k in at[:-1]:
        parent = parent[k]
    if rng.random() < 0.2:
        del parent[at[-1]]
        return f"removed {at}"
    old = parent[at[-1]]
    value = rng.choice(EXTREME_INTS if type(old) is int and rng.random() < 0.5 else WEIRD)
    parent[at[-1]] = value
    return f"{at} = {value!r}"[:300]


def test_random_edits_of_an_output(llama, cli, tmp_path):
    """One value of the output's config.json, index or manifest replaced or removed (the manifest also re-signed, so
    that the checks behind its signature see the edit): verify passes or reports findings (exit 0/1), inspect reads
    or refuses in one line (exit 0/2). A manifest row of 2^63 was an internal error (an OverflowError in numpy)."""
    rng = random.Random(20261204)
    good = tmp_path / "good"
    assert cli("build", write_recipe(tmp_path, llama, SOURCES, "gptq", RULES), "-o", good).exit_code == 0
    manifest = good / "mpconvert_manifest.json"
    targets = [("verify", good / f, False) for f in ("config.json", "model.safetensors.index.json")]
    targets += [("verify", manifest, False), ("verify", manifest, True), ("inspect", manifest, True)]
    seen = set()
    for trial in range(OUTPUT_EDITS):
        cmd, target, resigned = rng.choice(targets)
        kept = {p: p.read_bytes() for p in (target, good / "config.json")}
        try:
            doc = json.loads(target.read_text())
            how = mutate(doc, rng)
            raw = json.dumps(doc).encode()  # NaN and infinities as Python writes them: what a careless tool leaves
            target.write_bytes(raw)
            if resigned:
                cfg = json.loads((good / "config.json").read_text())
                cfg["quantization_config"]["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
                (good / "config.json").write_text(json.dumps(cfg))
            r = cli(cmd, good)
            what = f"edit {trial}: {cmd} after {target.name} {how}: exit {r.exit_code}\n{r.output[-2000:]}"
            assert r.exit_code in ((0, 1) if cmd == "verify" else (0, 2)), what
            assert "internal error" not in r.output and "Traceback" not in r.output, what
            if r.exit_code == 2:
                assert r.output.startswith("error: ") and r.output.count("error: ") == 1, what
            seen.add((cmd, r.exit_code))
        finally:
            for p, b in kept.items():
                p.write_bytes(b)
    # both commands both accepted and refused some edits: the mutations reach past the first check
    assert {("verify", 0), ("verify", 1), ("inspect", 0), ("inspect", 2)} <= seen, seen
