"""verify: prove a converted directory complete, consistent, shardable and (with --numeric) faithful.

Reads the manifest written by build and never re-derives it. Each problem is one Finding; the CLI exits 1 when
there is any. Checks:
  structure  — config.json ↔ manifest (sha256), index ↔ shards ↔ manifest, dtype/shape, sha256 of every tensor
  scheme     — per-format invariants (shapes, dtypes, g_idx range, zero convention, scales), fused units, folded scales
  tp         — every TP (and EP) split SGLang will make is legal for the module's kernel
  numeric    — per decoder block: dequantized vs bf16 base on the base's own hidden states; end-to-end logits
  engine     — (--engine sglang) SGLang's real classes build and load the model on CPU through the shim, at TP=1 and
               every rank of TP=N (experts split by --ep): each layer's quant method is its format's native one; every
               parameter is written
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import INDEX, read_json
from .errors import UserError
from .formats import FORMATS, Scheme, check_expected
from .layout import ModelInfo, role_of
from .manifest import MANIFEST, MIXED_EXPERTS, QUANT_METHOD, load_manifest, unit_groups
from .plan import ModulePlan, tp_problems
from .safetensors_io import TensorInfo, load_tensor, read_header, sha256_of


@dataclass
class Finding:
    check: str
    where: str
    message: str


@dataclass
class Report:
    directory: str
    checks: list[str] = field(default_factory=list)
    hashed: bool = True
    findings: list[Finding] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    numeric: dict | None = None
    engine: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, check: str, where: str, message: str) -> None:
        self.findings.append(Finding(check, where, message))

    def to_json(self) -> dict:
        return {"directory": self.directory, "ok": self.ok, "checks": self.checks, "hashed": self.hashed,
                "findings": [asdict(f) for f in self.findings], "memory": self.memory, "numeric": self.numeric, "engine": self.engine}


def _open(directory: Path) -> tuple[dict, dict]:
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory; pass a directory written by `mpconvert build`")
    if not (directory / MANIFEST).exists():
        raise UserError(f"{directory}: no {MANIFEST}; verify checks directories written by `mpconvert build`")
    return load_manifest(directory), read_json(directory / "config.json", "config.json")


def check_structure(d: Path, manifest: dict, config: dict, rep: Report, hash_tensors: bool,
                    on_step=lambda: None) -> dict[str, TensorInfo]:
    """Returns the tensors actually found (name → location) for the later checks."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        rep.add("structure", "config.json", f"quantization_config.quant_method is {qc.get('quant_method')!r}, not "
                                            f"{QUANT_METHOD!r}: SGLang would not hand this model to the shim")
    digest = hashlib.sha256((d / MANIFEST).read_bytes()).hexdigest()
    if qc.get("manifest_sha256") != digest:
        rep.add("structure", MANIFEST, "manifest was edited after build (its sha256 differs from config.json "
                                       "quantization_config.manifest_sha256); rebuild instead of editing")
    try:
        weight_map = read_json(d / INDEX, "safetensors index").get("weight_map", {})
    except UserError as e:
        rep.add("structure", INDEX, str(e))
        weight_map = {}
    found: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        p = (d / shard).resolve()
        if p.parent != d.resolve():
            rep.add("structure", INDEX, f"shard path {shard!r} escapes the directory")
            continue
        if not p.exists():
            rep.add("structure", shard, "shard listed in the index is missing")
            continue
        try:
            found.update(read_header(p)[0])
        except UserError as e:
            rep.add("structure", shard, str(e).removeprefix(f"{p}: "))
    expected = {t["name"]: (mod_name, t) for mod_name, mod in manifest["modules"].items()
                for t in mod["tensors"].values()}
    for name, (module, t) in expected.items():
        info = found.get(name)
        if weight_map.get(name) != t["shard"]:
            rep.add("structure", name, f"index places it in {weight_map.get(name)!r}, the manifest in {t['shard']!r}")
        if info is None:
            rep.add("structure", name, f"missing from the shards (manifest: {module}, {t['shard']})")
            continue
        if info.file.name != t["shard"]:
            rep.add("structure", name, f"found in {info.file.name}, the manifest says {t['shard']}")
        if info.dtype != t["dtype"] or list(info.shape) != t["shape"]:
            rep.add("structure", name, f"is {info.dtype}{list(info.shape)}, the manifest records "
                                       f"{t['dtype']}{t['shape']}")
        elif hash_tensors and sha256_of(info) != t["sha256"]:
            rep.add("structure", name, "sha256 differs from the manifest: the bytes changed after build")
        on_step()
    for name in sorted(set(found) - set(expected)):
        rep.add("structure", name, f"unexpected tensor in {found[name].file.name} (not in the manifest)")
    for name in sorted(set(weight_map) - set(expected) - set(found)):
        rep.add("structure", name, "listed in the index but neither in the manifest nor in any shard")
    return found


def _module_plans(manifest: dict) -> list[ModulePlan]:
    out = []
    for name, mod in manifest["modules"].items():
        if mod["kind"] != "linear":
            continue
        role = role_of(name)
        out.append(ModulePlan(name, role, Scheme.of(mod["format"], **mod["params"]), mod["source"], mod["chosen_by"],
                              *mod["shape"]))
    return out


def check_schemes(manifest: dict, found: dict[str, TensorInfo], rep: Report, values: bool = True) -> None:
    mods = manifest["modules"]
    for name, mod in mods.items():
        if mod["kind"] != "linear" or mod["format"] not in FORMATS:
            if mod["format"] not in FORMATS:
                rep.add("scheme", name, f"unknown format {mod['format']!r}")
            continue
        fmt = FORMATS[mod["format"]]
        tensors = {s: found[t["name"]] for s, t in mod["tensors"].items() if t["name"] in found}
        if len(tensors) != len(mod["tensors"]):
            continue  # already reported as missing
        try:
            check_expected(fmt, mod["params"], name, tensors, *mod["shape"], "scheme")
        except UserError as e:
            rep.add("scheme", name, str(e).removeprefix("scheme: "))
            continue
        if values:
            problem = fmt.check_values(name, {s: load_tensor(t) for s, t in tensors.items()}, mod["params"])
            if problem:
                rep.add("scheme", name, problem)
    # fused units: one format per SGLang layer (per expert group in a mixed-experts layer), as the unit table says
    for unit, u in manifest["units"].items():
        groups = unit_groups(u)
        group_of = {e: g for g in groups for e in (g["experts"] or [])}
        for member in u["members"]:
            m = mods.get(member)
            if m is None or m["unit"] != unit:
                rep.add("scheme", unit, f"member {member} is not a module of this unit in the manifest")
                continue
            g = group_of.get(m["expert"]) if u["format"] == MIXED_EXPERTS else groups[0]
            if g is None:
                rep.add("scheme", unit, f"{member} (expert {m['expert']}) is in no expert group of its layer")
            elif (m["format"], m["params"]) != (g["format"], g["params"]):
                rep.add("scheme", unit, f"{member} is {m['format']} {m['params']} but its fused unit (or expert "
                                        f"group) is {g['format']} {g['params']}: SGLang runs one kernel per fused "
                                        f"unit")
    check_folded(manifest, rep)


def check_folded(manifest: dict, rep: Report) -> None:
    """Norms/routers must be the version their consumers were quantized against; AWQ pairs stay together."""
    mods = manifest["modules"]
    consumers: dict[tuple, list[str]] = {}
    pairs: dict[str, dict[str, str]] = {}
    for name, mod in mods.items():
        role = role_of(name)
        if mod["kind"] == "linear" and role.stage:
            consumers.setdefault((role.layer, role.stage), []).append(name)
        if mod["kind"] == "linear" and role.pair:
            pairs.setdefault(role.pair[0], {})[role.pair[1]] = name
    for name, mod in mods.items():
        role = role_of(name)
        if mod["kind"] == "linear" or not role.stage:
            continue
        for c in consumers.get((role.layer, role.stage), []):
            src = mods[c]["source"]
            # (a base-version norm with AWQ consumers is legal when the producer left that norm alone — build
            # compared values; whether the bytes here are right is for --numeric to see)
            if mod["source"] != "base" and src != mod["source"]:
                rep.add("scheme", name, f"comes from {mod['source']!r} (folded scales) but its consumer {c} comes "
                                        f"from {src!r}")
    for p in pairs.values():
        a, b = p.get("producer"), p.get("consumer")
        if a and b and mods[a]["source"] != mods[b]["source"] and mods[a]["shape"][0] == mods[b]["shape"][1]:
            if FORMATS[mods[a]["format"]].folds_scales or FORMATS[mods[b]["format"]].folds_scales:
                rep.add("scheme", b, f"comes from {mods[b]['source']!r} but {a} from {mods[a]['source']!r}; AWQ folds "
                                     f"one into the other")


def check_tp(manifest: dict, rep: Report, tp: int, ep: int) -> None:
    model = manifest["model"]
    info = ModelInfo(model["model_type"], model["num_hidden_layers"], model["num_attention_heads"],
                     model["num_key_value_heads"], model["num_experts"])
    for p in tp_problems(_module_plans(manifest), info, tp):
        name = p.split(": ", 1)[1].split(" ", 1)[0]
        rep.add("tp", name, p)
    if ep > 1 and info.num_experts and info.num_experts % ep:
        rep.add("tp", "model", f"--ep {ep}: {info.num_experts} experts cannot be split evenly over {ep} ranks")


def memory_report(manifest: dict, found: dict[str, TensorInfo], tp: int) -> dict:
    by_format: dict[str, int] = {}
    per_rank = 0
    for name, mod in manifest["modules"].items():
        nbytes = sum(found[t["name"]].nbytes for t in mod["tensors"].values() if t["name"] in found)
        by_format[mod["format"]] = by_format.get(mod["format"], 0) + nbytes
        role = role_of(name)
        parallel = role.parallel if role else "replicated"
        per_rank += nbytes / tp if parallel in ("column", "row", "vocab") else nbytes
    total = sum(by_format.values())
    linear = sum(v for k, v in by_format.items() if k != "unquantized")
    t = manifest["totals"]
    bf16 = 2 * t["linear_weights"] + (t["bytes"] - t["linear_bytes"])
    return {"bytes": total, "by_format": by_format, "tp": tp, "bytes_per_rank": int(per_rank),
            "bits_per_weight": t["bits_per_weight"], "vs_bf16": round(total / bf16, 4) if bf16 else None,
            "quantized_bytes": linear}


def verify(directory: Path, tp: int = 1, ep: int = 1, hash_tensors: bool = True, base: Path | None = None,
           numeric: bool = False, thresholds: dict | None = None, on_step=lambda: None,
           engine: str | None = None, dtype: str = "auto") -> Report:
    directory = Path(directory)
    if tp < 1 or ep < 1:
        raise UserError("--tp and --ep must be ≥ 1")
    if numeric and base is None:
        raise UserError("--numeric needs --base BASE (the bf16 model the sources were quantized from)")
    manifest, config = _open(directory)
    rep = Report(str(directory), hashed=hash_tensors)
    rep.checks = ["structure" + ("" if hash_tensors else " (--fast: sha256 skipped)"), "scheme", f"tp={tp} ep={ep}"]
    found = check_structure(directory, manifest, config, rep, hash_tensors, on_step)
    check_schemes(manifest, found, rep)
    check_tp(manifest, rep, tp, ep)
    rep.memory = memory_report(manifest, found, tp)
    if numeric:
        rep.checks.append("numeric")
        if any(f.check == "structure" for f in rep.findings):
            rep.add("numeric", str(directory), "skipped: the structure is broken")
        else:
            from .fidelity import numeric_check

            rep.numeric = numeric_check(directory, manifest, found, Path(base), rep, thresholds or {})
    if engine:
        if engine != "sglang":
            raise UserError(f"--engine {engine}: the only engine is sglang")
        if ep > 1 and (ep > tp or tp % ep):
            raise UserError(f"--engine sglang --ep {ep}: SGLang splits experts over the TP ranks; --tp must be a "
                            f"multiple of --ep (got --tp {tp})")
        rep.checks.append(f"engine=sglang (tp=1{f', tp={tp}' if tp > 1 else ''}{f' ep={ep}' if ep > 1 else ''}, "
                          f"dtype={dtype})")
        if any(f.check == "structure" for f in rep.findings):
            rep.add("engine", str(directory), "skipped: the structure is broken")
        else:
            from .engine import check_engine

            rep.engine = check_engine(directory, manifest, tp, dtype, rep, ep)
    return rep


def total_steps(directory: Path) -> int:
    m = json.loads((Path(directory) / MANIFEST).read_text())
    return sum(len(mod["tensors"]) for mod in m["modules"].values())
