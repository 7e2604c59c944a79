"""The manifest: the single source of truth about a converted directory, written by build, read by verify and shim.

Per module: role, SGLang unit, format + params, source + the rule that chose it, and per tensor name/dtype/shape/
sha256/shard (and the exact rewrite applied, if any). Per unit (SGLang's fused layer prefix): format + params +
members. Deterministic: no timestamps, no absolute paths; keys sorted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint import read_json
from .errors import UserError

MANIFEST = "mpconvert_manifest.json"
MANIFEST_VERSION = 1
QUANT_METHOD = "mpconvert"
# a MoE unit whose experts come in several formats: its "groups" list each format's params and expert ids
MIXED_EXPERTS = "mixed_experts"
# where the runtime shim puts a mixed-experts layer's per-format FusedMoE layers (`<unit>.expert_groups.<i>`, i the
# group's index in the manifest); verify --engine looks them up by that name
EXPERT_GROUPS = "expert_groups"


def unit_groups(spec: dict) -> list[dict]:
    """A unit's formats: [{format, params, experts}], experts None meaning all of them (every unit but a
    mixed-experts one has exactly one group)."""
    if spec["format"] == MIXED_EXPERTS:
        return spec["groups"]
    return [{"format": spec["format"], "params": spec["params"], "experts": None}]


def unit_formats(manifest: dict) -> list[str]:
    return sorted({g["format"] for spec in manifest["units"].values() for g in unit_groups(spec)})


def describe_unit(spec: dict) -> str:
    """fp8 / 'mixed_experts: fp8 [0-3], gptq [4-7]'"""
    if spec["format"] != MIXED_EXPERTS:
        return spec["format"]
    return MIXED_EXPERTS + ": " + ", ".join(f"{g['format']} {_ranges(g['experts'])}" for g in spec["groups"])


def _ranges(ids: list[int]) -> str:
    out, start = [], None
    for i, e in enumerate(ids):
        if start is None:
            start = e
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            out.append(f"{start}" if start == e else f"{start}-{e}")
            start = None
    return "[" + ",".join(out) + "]"


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def build_manifest(plan, shard_of: dict[str, str], digests: dict[str, str]) -> dict:
    from . import __version__

    modules = {}
    for m in plan.modules:
        modules[m.name] = {
            "kind": m.role.kind, "unit": m.role.unit, "layer": m.role.layer, "expert": m.role.expert,
            "format": m.scheme.format, "params": m.scheme.params, "source": m.source, "chosen_by": m.why,
            "shape": [m.out_features, m.in_features] if m.role.kind == "linear" else None,
            "tensors": {s: {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "sha256": digests[t.name],
                            "shard": shard_of[t.name], **({"rewrite": t.rewrite_name} if t.rewrite_name else {}),
                            **({"renamed_from": t.renamed_from} if t.renamed_from else {})}
                        for s, t in sorted(m.tensors.items())},
        }
    sources = {}
    for label, src in sorted(plan.sources.items()):
        raw = plan.recipe.base if label == "base" else plan.recipe.sources[label]
        sources[label] = {"path": raw, "kind": src.kind, "producer": src.producer, "description": src.describe(),
                          "fingerprint": src.ckpt.fingerprint(), "files": dict(sorted(src.ckpt.file_fingerprints.items()))}
    return {
        "manifest_version": MANIFEST_VERSION, "mpconvert_version": __version__,
        "model": {"model_type": plan.info.model_type, "num_hidden_layers": plan.info.num_layers,
                  "num_attention_heads": plan.info.num_heads, "num_key_value_heads": plan.info.num_kv_heads,
                  "num_experts": plan.info.num_experts},
        "built_for_tp": plan.tp,
        "recipe": json.loads(plan.recipe.model_dump_json()),
        **({"routing_files": routing} if (routing := plan.recipe.routing_files()) else {}),
        "sources": sources, "units": plan.units, "modules": modules,
        "totals": totals(plan),
    }


def totals(plan) -> dict:
    by_format: dict[str, dict] = {}
    for m in plan.modules:
        if m.role.kind != "linear":
            continue
        d = by_format.setdefault(m.scheme.format, {"modules": 0, "bytes": 0, "weights": 0})
        d["modules"] += 1
        d["bytes"] += sum(t.nbytes for t in m.tensors.values() if not t.name.endswith(".bias"))
        d["weights"] += m.out_features * m.in_features
    lin_bytes = sum(d["bytes"] for d in by_format.values())
    lin_weights = sum(d["weights"] for d in by_format.values())
    return {"bytes": plan.total_bytes, "linear_bytes": lin_bytes, "linear_weights": lin_weights,
            "bits_per_weight": round(8 * lin_bytes / lin_weights, 4) if lin_weights else None,
            "by_format": by_format}


def quantization_config(manifest_bytes: bytes, formats: list[str]) -> dict:
    """What config.json says, so that SGLang hands the model to the runtime shim (quant_method "mpconvert")."""
    return {"quant_method": QUANT_METHOD, "manifest": MANIFEST, "manifest_version": MANIFEST_VERSION,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "formats": sorted(formats)}


def load_manifest(directory: Path) -> dict:
    m = read_json(Path(directory) / MANIFEST, "mpconvert manifest")
    if m.get("manifest_version") != MANIFEST_VERSION:
        raise UserError(f"{directory / MANIFEST}: manifest_version {m.get('manifest_version')!r} is not "
                        f"{MANIFEST_VERSION}; rebuild with this mpconvert")
    return m
