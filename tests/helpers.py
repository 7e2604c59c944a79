"""What several test files share: recipes over the fixtures, build/verify/load helpers and the bad-input check."""
from __future__ import annotations

import json
import shutil
import struct
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mpconvert.checkpoint import Checkpoint
from mpconvert.engine import run_ranks
from mpconvert.fidelity import module_band
from mpconvert.manifest import MANIFEST
from mpconvert.numeric import dequantize, dequantize_from_manifest, rel_error
from mpconvert.safetensors_io import load_tensor, sha256_of
from mpconvert.sources import open_source


def write_recipe(dir: Path, fixtures: dict[str, Path], sources: dict[str, str], default: str, rules: str = "",
                 extra: str = "") -> Path:
    """A recipe whose sources name fixture kinds: {"fp8": "ct-fp8-static", ...}."""
    lines = [f"base: {fixtures['base']}", "sources:"] + [f"  {n}: {fixtures[k]}" for n, k in sources.items()]
    lines.append(f"default: {default}")
    if rules:
        lines.append("rules:")
        lines.append(textwrap.indent(textwrap.dedent(rules).strip("\n"), "  "))
    if extra:
        lines.append(textwrap.dedent(extra).strip("\n"))
    p = dir / "recipe.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def refused(r, match: str) -> str:
    """A command's result is a usage refusal: exit 2, one (wrapped) `error:` line containing `match`, no traceback.
    Returns the line, whitespace folded."""
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "Traceback" not in r.output
    assert match in text, text
    assert text.startswith("error: ") and len(r.output.strip().splitlines()) <= 4  # one (wrapped) line
    return text


def fails(cli, tmp_path, *args, match: str, out: Path | None = None):
    out = out or tmp_path / "out"
    r = cli("build", *args, "-o", out) if args and "-o" not in args else cli("build", *args)
    text = refused(r, match)
    leftovers = [p.name for p in tmp_path.iterdir() if "mpconvert-tmp" in p.name]
    assert not leftovers, leftovers
    return text


def header_of(f: Path) -> tuple[dict, bytes]:
    """A safetensors file as (its header parsed, the data after it), for tests that edit headers."""
    b = f.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def put_header(f: Path, header: dict, data: bytes) -> None:
    """Rewrite `f` with this header (padded to 8 bytes, as writers do) and data."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def without_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of a fixture checkpoint with no tokenizer files (as a training run often saves a model)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt",
                                                            "special_tokens_map.json", "chat_template*"))
    return dst


DENSE_RULES = """
- {match: "self_attn.*", layers: 0, source: fp8}
- {match: "mlp.*", layers: 0, source: int8}
- {match: "self_attn.*", layers: 1, source: awq}
- {match: lm_head, source: fp8blk}
"""


def build(cli, recipe: Path, out: Path, *extra):
    r = cli("build", recipe, "-o", out, *extra)
    assert r.exit_code == 0, r.output
    return manifest_json(out)


def manifest_json(d: Path) -> dict:
    """A converted directory's manifest as raw JSON with each module's scheme written into it ("format", "params")
    and its tensor rows as objects ("tensors": suffix → name, dtype, shape, sha256, shard, rewrite?, renamed_from?) —
    the manifest stores each scheme once and the tensors as one table; this view is for assertions."""
    m = json.loads((Path(d) / MANIFEST).read_text())
    t = m["tensors"]

    def row(r: int) -> dict:
        out = {"name": t["name"][r], "dtype": t["dtype"][r], "shape": t["shape"][r], "sha256": t["sha256"][r],
               "shard": m["shards"][t["shard"][r]]}
        out.update({k: t[k][str(r)] for k in ("rewrite", "renamed_from") if str(r) in t[k]})
        return out

    for mod in m["modules"].values():
        s = m["schemes"][mod["scheme_id"]]
        mod["format"], mod["params"] = s["format"], dict(s["params"])
        mod["tensors"] = {suffix: row(r) for suffix, r in mod["tensors"].items()}
    return m


def tensor_row(m: dict, name: str) -> int:
    """The row of tensor `name` in raw manifest JSON m's tensor table (to edit a column)."""
    return m["tensors"]["name"].index(name)


def set_scheme(m: dict, module: str, fmt: str | None = None, **params) -> None:
    """Edit raw manifest JSON m (as read from the file): point `module` at a new scheme — its own with `fmt` and
    `params` changed — leaving the other modules of its old scheme as they were."""
    mod = m["modules"][module]
    old = m["schemes"][mod["scheme_id"]]
    m["schemes"].append({"format": fmt or old["format"], "params": {**old["params"], **params}})
    mod["scheme_id"] = len(m["schemes"]) - 1


# check_faithful: ‖Ŵ−W‖/‖W‖ of a correctly decoded module vs the bf16 base within the same band verify --numeric uses
# (a multiple of what round-to-nearest in the module's own scheme gets on the same weight)
def check_faithful(out: Path, manifest: dict, fixtures: dict[str, Path], sources: dict[str, str],
                   model_type: str) -> dict:
    """Every output tensor is byte-identical to its source tensor, and every module dequantizes exactly as in its
    source and within its format's band of the bf16 base. `sources` is the recipe's name → fixture kind.
    Returns {format: worst error ÷ round-to-nearest's} for reporting."""
    ck = Checkpoint.open(out, "out")
    base_src = open_source("base", fixtures["base"], model_type)
    opened = {label: open_source(label, fixtures[kind], model_type) for label, kind in sources.items()}
    opened["base"] = base_src
    worst: dict[str, float] = {}
    for name, mod in manifest["modules"].items():
        src = opened[mod["source"]].modules[name]
        for suffix, t in mod["tensors"].items():
            info = ck.tensors[t["name"]]
            assert [info.dtype, list(info.shape)] == [t["dtype"], t["shape"]], name
            assert sha256_of(info) == t["sha256"], f"{t['name']}: bytes differ from the manifest"
            if "rewrite" not in t:
                src_suffix = t.get("renamed_from", suffix)
                assert t["sha256"] == sha256_of(src.tensors[src_suffix]), f"{t['name']}: not byte-exact"
        if mod["kind"] != "linear":
            continue
        got = dequantize_from_manifest(ck, mod)
        want = dequantize(src.scheme, src.tensors, *mod["shape"])
        assert torch.equal(got, want), f"{name}: dequantizes differently from its source"
        ref = load_tensor(base_src.modules[name].tensors["weight"]).float()
        if mod["format"] == "awq":
            if not name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                continue  # o/down are scaled by the (unstored) v/up folding; checked via their producers
            norm = "input_layernorm" if "self_attn" in name else "post_attention_layernorm"
            layer = name.split(".self_attn")[0].split(".mlp")[0]
            n_src = load_tensor(opened[mod["source"]].modules[f"{layer}.{norm}"].tensors["weight"]).float()
            n_base = load_tensor(base_src.modules[f"{layer}.{norm}"].tensors["weight"]).float()
            got, ref = got * n_src, ref * n_base  # folded scales: norm·W is what the model computes
        err = rel_error(got, ref)
        band, rtn = module_band(mod["format"], mod["params"], ref)
        assert err <= band, f"{name} ({mod['format']}): error {err:.4f} vs bf16 base, band {band:.4f}"
        worst[mod["format"]] = max(worst.get(mod["format"], 0.0), err / rtn if rtn else 0.0)
    return worst


def load(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def refusal(path: Path, dtype: str = "auto") -> str:
    """What SGLang or the shim said when refusing to build the model at TP=1."""
    [r] = run_ranks(path, 1, dtype)
    assert "error" in r, "SGLang built the model"
    return r["error"]


def loaded(path: Path, tp: int = 1, dtype: str = "auto") -> list[dict]:
    """SGLang builds and loads the directory on CPU, one process per TP rank (what verify --engine runs); each rank
    was offered every converted tensor and wrote every parameter (none silently skipped)."""
    ranks = run_ranks(path, tp, dtype)
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    names = manifest_tensor_names(path)
    for r in ranks:
        assert set(r["loaded"]) == names
        assert r["untouched"] == []
    return ranks


THREE_SOURCES = {"fp8": "ct-fp8-block", "int8": "ct-w8a8", "gptq": "gptq"}


def manifest_tensor_names(d: Path) -> set[str]:
    manifest = manifest_json(d)
    return {t["name"] for mod in manifest["modules"].values() for t in mod["tensors"].values()}


DENSE_SOURCES = {"fp8": "ct-fp8-static", "int8": "ct-w8a8", "gptq": "gptq", "awq": "awq", "fp8blk": "native-fp8-block"}


MIXED_EXPERTS_RULES = """
- {match: "mlp.experts.*", experts: "0-2", source: fp8}
- {match: "mlp.experts.*", layers: 1, experts: [3, "5-6"], source: int8}
- {match: "mlp.experts.*", source: gptq}
"""


def build_once(module_dir: Path, fixtures: dict[str, Path], sources: dict[str, str], default: str, rules: str,
               name: str) -> Path:
    """Build a recipe over fixture kinds into a fresh directory under module_dir (for module-scoped fixtures, where the
    function-scoped `cli` fixture cannot be used); the output path."""
    from typer.testing import CliRunner

    from mpconvert.cli.main import app

    d = module_dir / name
    d.mkdir()
    r = write_recipe(d, fixtures, sources, default, rules)
    res = CliRunner().invoke(app, ["build", str(r), "-o", str(d / "out")])
    assert res.exit_code == 0, res.output
    return d / "out"


def resign(d: Path, manifest: dict) -> None:
    """Write an edited manifest (JSON) into converted directory d and re-sign config.json with its sha256, so that only
    the checks behind the signature can see the edit."""
    import hashlib

    raw = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    (d / MANIFEST).write_bytes(raw)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def run_verify(cli, d: Path, *args):
    r = cli("verify", d, "--json", *args)
    assert r.exit_code in (0, 1), r.output
    rep = json.loads(r.stdout)
    assert rep["ok"] == (r.exit_code == 0)
    return rep


def edited_source(src: Path, dst: Path, edit) -> Path:
    """A copy of a source checkpoint whose tensors edit(tensors: dict) changed, shard by shard (a source has no
    manifest: mutate is for converted directories)."""
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        sd = load_file(f)
        edit(sd)
        save_file(sd, f, metadata={"format": "pt"})
    return dst


def mutate(src: Path, dst: Path, change, rehash: bool = False) -> Path:
    """Copy a converted dir and change tensors: change(tensors: dict) edits the dict of the shard holding them.
    With rehash, the manifest and config are updated to match — a corruption only deeper checks can see."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    for shard in sorted(dst.glob("model-*.safetensors")):
        sd = load_file(shard)
        before = {k: v.clone() for k, v in sd.items()}
        change(sd)
        if any(k not in before or not torch.equal(before[k].view(torch.uint8) if before[k].dtype.itemsize == 1
                                                  else before[k], sd[k].view(torch.uint8)
                                                  if sd[k].dtype.itemsize == 1 else sd[k]) for k in sd) or \
                set(sd) != set(before):
            save_file(sd, shard, metadata={"format": "pt"})
    if rehash:
        ck = Checkpoint.open(dst, "x")
        table = manifest["tensors"]
        for r, name in enumerate(table["name"]):
            if name in ck.tensors:
                table["sha256"][r] = sha256_of(ck.tensors[name])
        resign(dst, manifest)
    return dst


def messages(rep) -> str:
    return " | ".join(f"{f['check']} {f['where']}: {f['message']}" for f in rep["findings"])
