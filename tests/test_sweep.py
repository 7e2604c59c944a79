"""A sweep of random corruptions of real converted directories (a mixed dense Llama of five sources, a mixed-experts
Qwen3-MoE), by kind: full verify must catch every one, --fast every one but changes of data bytes (which only the
sha256 and NaN scans see). Value corruptions are injected with the manifest's digests and config.json's signature
re-synced, so that only the value checks can see them; manifest edits likewise."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from mpconvert.safetensors_io import read_header
from mpconvert.verify import verify

from helpers import DENSE_RULES, DENSE_SOURCES, MIXED_EXPERTS_RULES as MOE_RULES, THREE_SOURCES as MOE_SOURCES, \
    build_once, header_of, manifest_json, put_header, resign, set_scheme, tensor_row

PER_KIND = 12  # instances of each kind in each directory


# ---- helpers over a converted directory ---------------------------------------------------------------------------
def manifest_of(d: Path) -> dict:
    """The raw manifest JSON, to edit and resign."""
    return json.loads((d / "mpconvert_manifest.json").read_text())


def tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("model-*.safetensors")):
        out.update(read_header(f)[0])
    return out


def rewrite(info, fn) -> None:
    """Edit one tensor's bytes in place: fn(bytearray) changes them."""
    with open(info.file, "r+b") as f:
        f.seek(info.start)
        b = bytearray(f.read(info.nbytes))
        fn(b)
        f.seek(info.start)
        f.write(bytes(b))


def resync_tensor(d: Path, name: str) -> None:
    info = tensors(d)[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        sha = hashlib.sha256(f.read(info.nbytes)).hexdigest()
    m = manifest_of(d)
    m["tensors"]["sha256"][tensor_row(m, name)] = sha
    resign(d, m)


def set_element(info, value: float, rng) -> None:
    dt = {"F32": np.float32, "F16": np.float16, "BF16": None, "I32": np.int32}[info.dtype]

    def fn(b):
        n = info.nbytes // (4 if info.dtype in ("F32", "I32") else 2)
        i = rng.randrange(n)
        if info.dtype == "BF16":
            word = (np.array([value], np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            b[2 * i:2 * i + 2] = word
        else:
            size = np.dtype(dt).itemsize
            b[size * i:size * (i + 1)] = np.array([value], dt).tobytes()
    rewrite(info, fn)


def pick(rng, names, *suffixes):
    names = sorted(n for n in names if n.endswith(suffixes))
    return rng.choice(names)


# ---- the kinds -------------------------------------------------------------------------------------------------------
def flip_byte(d, rng):
    info = rng.choice([t for t in tensors(d).values() if t.nbytes])
    k = rng.randrange(info.nbytes)
    rewrite(info, lambda b: b.__setitem__(k, b[k] ^ (1 << rng.randrange(8))))


def swap_tensors(d, rng):
    ts = tensors(d)
    groups: dict = {}
    for t in ts.values():
        groups.setdefault((t.dtype, t.shape), []).append(t)
    pairs = [g for g in groups.values() if len(g) > 1]
    a, b = rng.sample(rng.choice(pairs), 2)
    with open(a.file, "rb") as f:
        f.seek(a.start)
        ba = f.read(a.nbytes)
    with open(b.file, "rb") as f:
        f.seek(b.start)
        bb = f.read(b.nbytes)
    if ba == bb:  # identical bytes (e.g. equal zero points): flip one instead
        return flip_byte(d, rng)
    rewrite(a, lambda x: x.__setitem__(slice(None), bb))
    rewrite(b, lambda x: x.__setitem__(slice(None), ba))


def nan_in_fp8_weight(d, rng):
    ts = tensors(d)
    info = rng.choice([t for t in ts.values() if t.dtype == "F8_E4M3"])
    k = rng.randrange(info.nbytes)
    rewrite(info, lambda b: b.__setitem__(k, 0x7F | (b[k] & 0x80)))
    resync_tensor(d, info.name)


def append_bytes(d, rng):
    f = rng.choice(sorted(d.glob("model-*.safetensors")))
    with open(f, "ab") as fh:
        fh.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))


def truncate(d, rng):
    f = rng.choice(sorted(d.glob("model-*.safetensors")))
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - rng.randrange(1, min(4096, size // 4)))


def edit_index(d, rng):
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    name = rng.choice(sorted(idx["weight_map"]))
    if rng.random() < 0.5:
        del idx["weight_map"][name]
    else:
        idx["weight_map"][name] = "model-00009-of-00009.safetensors"
    p.write_text(json.dumps(idx))


def edit_a_shard_header(d, rng, edit) -> None:
    """edit(header dict) on a random shard's header; the data stays as it was."""
    f = rng.choice(sorted(d.glob("model-*.safetensors")))
    h, data = header_of(f)
    edit(h)
    put_header(f, h, data)


def edit_header_dtype(d, rng):
    same = {"BF16": "F16", "F16": "BF16", "I32": "F32", "F32": "I32", "F8_E4M3": "I8", "I8": "F8_E4M3"}

    def edit(h):
        name = rng.choice(sorted(k for k, v in h.items() if k != "__metadata__" and v["dtype"] in same))
        h[name]["dtype"] = same[h[name]["dtype"]]
    edit_a_shard_header(d, rng, edit)


def remove_tensor(d, rng):
    from safetensors.torch import load_file, save_file

    f = rng.choice(sorted(d.glob("model-*.safetensors")))
    sd = load_file(f)
    sd.pop(rng.choice(sorted(sd)))
    save_file(sd, f, metadata={"format": "pt"})


def _changed(v, rng):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + rng.choice([-1, 1, 7])
    if isinstance(v, float):
        return v * 1.5 + 1e-3
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, list):
        return v + [1]
    if isinstance(v, dict):
        return {**v, "edited": 1}
    return 1


def edit_config_field(d, rng):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    k = rng.choice(sorted(k for k in cfg if k != "quantization_config"))
    cfg[k] = _changed(cfg[k], rng)
    p.write_text(json.dumps(cfg, indent=2))


def _retyped(v):
    """The same value to Python's == in another JSON type (1 → true or 1.0, false → 0), or None."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, int) or isinstance(v, float) and v.is_integer():
        return float(v) if isinstance(v, int) else int(v)
    return None


def retype_config_value(d, rng):
    """A config.json value given another JSON type with the same value to Python (1 → true, 2 → 2.0, false → 0):
    loaders see another value (a bool flag, a float where an int is expected)."""
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    k = rng.choice(sorted(k for k, v in cfg.items() if _retyped(v) is not None))
    cfg[k] = _retyped(cfg[k])
    p.write_text(json.dumps(cfg, indent=2))


def edit_index_metadata(d, rng):
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    choice = rng.randrange(3)
    if choice == 0:
        idx.pop("metadata")
    else:
        idx["metadata"]["total_size"] = idx["metadata"]["total_size"] + 1 if choice == 1 else \
            float(idx["metadata"]["total_size"])
    p.write_text(json.dumps(idx))


def edit_shard_metadata(d, rng):
    edit_a_shard_header(d, rng, lambda h: h.update(__metadata__=rng.choice([{}, {"format": "np"},
                                                                            {"format": "pt", "by": "someone"}])))


def edit_quantization_config(d, rng):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    qc = cfg["quantization_config"]
    k = rng.choice(sorted(k for k in qc if k != "manifest_sha256"))
    qc[k] = _changed(qc[k], rng)
    p.write_text(json.dumps(cfg, indent=2))


def edit_side_file(d, rng):
    f = rng.choice(sorted(p for p in d.iterdir() if p.name.startswith(("tokenizer", "special", "generation"))))
    if rng.random() < 0.3:
        f.unlink()
    else:
        f.write_bytes(f.read_bytes() + b" ")


def bad_scale(d, rng):
    info = tensors(d)[pick(rng, tensors(d), ".weight_scale", ".input_scale", ".scales")]
    set_element(info, rng.choice([float("nan"), 0.0, -0.5, float("inf")]), rng)
    resync_tensor(d, info.name)


def bad_g_idx(d, rng):
    info = tensors(d)[pick(rng, tensors(d), ".g_idx")]
    set_element(info, rng.choice([-1, 10_000]), rng)
    resync_tensor(d, info.name)


def bad_zero(d, rng):
    info = tensors(d)[pick(rng, tensors(d), "qzeros")]
    if manifest_json(d)["modules"][info.name.rsplit(".", 1)[0]]["format"] != "gptq":
        return bad_scale(d, rng)  # AWQ zeros are any 4-bit values: nothing to break there
    set_element(info, rng.choice([0, 0x66666666, -1]), rng)
    resync_tensor(d, info.name)


def nan_norm(d, rng):
    info = tensors(d)[pick(rng, tensors(d), "norm.weight")]
    set_element(info, float("nan"), rng)
    resync_tensor(d, info.name)


def manifest_model_block(d, rng):
    m = manifest_of(d)
    k = rng.choice(["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "model_type", "num_experts"])
    m["model"][k] = _changed(m["model"][k], rng) if k != "num_experts" else m["model"][k] + 8
    resign(d, m)


def manifest_totals(d, rng):
    m = manifest_of(d)
    t = m["totals"]
    k = rng.choice(["bytes", "linear_bytes", "linear_weights", "bits_per_weight", "by_format"])
    t[k] = _changed(t[k], rng)
    resign(d, m)


def manifest_kind(d, rng):
    m = manifest_of(d)
    name = rng.choice(sorted(n for n, x in m["modules"].items() if x["kind"] == "linear"))
    m["modules"][name]["kind"] = rng.choice(["norm", "router", "embedding"])
    resign(d, m)


def manifest_params(d, rng):
    m = manifest_of(d)
    name = rng.choice(sorted(n for n, x in m["modules"].items() if x["kind"] == "linear"))
    p = m["schemes"][m["modules"][name]["scheme_id"]]["params"]
    k = rng.choice(sorted(p))
    set_scheme(m, name, **{k: _changed(p[k], rng)})
    resign(d, m)


def manifest_built_for(d, rng):
    m = manifest_of(d)
    m["built_for_tp"] = rng.choice([3, 5, 64])
    resign(d, m)


def manifest_unit(d, rng):
    m = manifest_of(d)
    unit = rng.choice(sorted(m["units"]))
    u = m["units"][unit]
    if u["format"] == "mixed_experts":
        g = u["groups"]
        g[0]["experts"], g[-1]["experts"] = g[-1]["experts"], g[0]["experts"]
    else:
        u["format"] = "gptq" if u["format"] != "gptq" else "unquantized"
        u["params"] = {"dtype": "BF16"} if u["format"] == "unquantized" else \
            {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    resign(d, m)


def manifest_tensor_shape(d, rng):
    m = manifest_of(d)
    name = rng.choice(sorted(m["modules"]))
    r = rng.choice(list(m["modules"][name]["tensors"].values()))  # a row of the tensor table
    m["tensors"]["shape"][r] = [x + 1 for x in m["tensors"]["shape"][r]] or [1]
    resign(d, m)


def manifest_schema(d, rng):
    m = manifest_of(d)
    action = rng.randrange(4)
    name = rng.choice(sorted(m["modules"]))
    if action == 0:
        m["modules"][name].pop(rng.choice(["kind", "unit", "scheme_id", "tensors", "source"]))
    elif action == 1:
        m["modules"][name]["layer"] = "one"
    elif action == 2:
        m.pop(rng.choice(["model", "totals", "units", "sources", "config", "files"]))
    else:
        set_scheme(m, name, "int3")
    resign(d, m)


def recorded_digest(d, rng):
    m = manifest_of(d)
    name = rng.choice(sorted(m["modules"]))
    r = rng.choice(list(m["modules"][name]["tensors"].values()))  # a row of the tensor table
    m["tensors"]["sha256"][r] = hashlib.sha256(m["tensors"]["sha256"][r].encode()).hexdigest()
    resign(d, m)


# kind → (corruption, whether --fast must catch it too)
KINDS = {
    "flipped bit in tensor data": (flip_byte, False),
    "two tensors swapped": (swap_tensors, False),
    "NaN in an FP8 weight (re-synced)": (nan_in_fp8_weight, False),
    "recorded digest edited (re-synced)": (recorded_digest, False),
    "bytes appended to a shard": (append_bytes, True),
    "shard truncated": (truncate, True),
    "index entry moved or dropped": (edit_index, True),
    "dtype edited in a shard header": (edit_header_dtype, True),
    "tensor removed from a shard": (remove_tensor, True),
    "config.json field edited": (edit_config_field, True),
    "quantization_config field edited": (edit_quantization_config, True),
    "config.json value retyped (1 → true, 2 → 2.0)": (retype_config_value, True),
    "index metadata.total_size edited or dropped": (edit_index_metadata, True),
    "shard __metadata__ edited": (edit_shard_metadata, True),
    "tokenizer/generation file edited or removed": (edit_side_file, True),
    "bad scale (re-synced)": (bad_scale, True),
    "g_idx out of range (re-synced)": (bad_g_idx, True),
    "GPTQ v1 zero convention broken (re-synced)": (bad_zero, True),
    "NaN in a norm (re-synced)": (nan_norm, True),
    "manifest model block (re-synced)": (manifest_model_block, True),
    "manifest totals (re-synced)": (manifest_totals, True),
    "manifest kind linear→other (re-synced)": (manifest_kind, True),
    "manifest params (re-synced)": (manifest_params, True),
    "manifest built_for_tp (re-synced)": (manifest_built_for, True),
    "manifest unit table (re-synced)": (manifest_unit, True),
    "manifest tensor shape (re-synced)": (manifest_tensor_shape, True),
    "manifest schema broken (re-synced)": (manifest_schema, True),
}


@pytest.fixture(scope="module")
def converted(llama, moe, module_dir):
    return {"dense": build_once(module_dir, llama, DENSE_SOURCES, "gptq", DENSE_RULES, "dense"),
            "moe": build_once(module_dir, moe, MOE_SOURCES, "int8", MOE_RULES, "moe")}


def test_every_injected_corruption_is_caught(converted, tmp_path):
    rng = random.Random(2026)
    rows, missed = {}, []
    for label, src in converted.items():
        assert verify(src).ok and verify(src, hash_tensors=False).ok
        for kind, (corrupt, fast_too) in KINDS.items():
            caught = caught_fast = 0
            for i in range(PER_KIND):
                d = tmp_path / f"{label}-{i}"
                shutil.copytree(src, d)
                corrupt(d, rng)
                full, fast = verify(d), verify(d, hash_tensors=False)
                caught += not full.ok
                caught_fast += not fast.ok
                if full.ok or (fast_too and fast.ok):
                    missed.append(f"{label}/{kind}/{i}: full {'caught' if not full.ok else 'MISSED'}, fast "
                                  f"{'caught' if not fast.ok else 'missed'}")
                shutil.rmtree(d)
            row = rows.setdefault(kind, [0, 0, 0])
            row[0] += PER_KIND
            row[1] += caught
            row[2] += caught_fast
    print(f"\n{'kind':48} {'injected':>8} {'verify':>8} {'--fast':>8}")
    for kind, (n, full, fast) in rows.items():
        print(f"{kind:48} {n:8} {full / n:8.0%} {fast / n:8.0%}")
    total = sum(r[0] for r in rows.values())
    print(f"total injected: {total}")
    assert total >= 500
    assert not missed, "\n".join(missed)
