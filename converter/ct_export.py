"""build --to compressed-tensors: the mix as an ordinary compressed-tensors checkpoint, which stock SGLang (no
plugin) and compressed-tensors' own loader read with no mpconvert installed (tested; vLLM, whose compressed-tensors
matching SGLang's is adapted from, is not installed here).

What changes against the mpconvert layout is only how modules are written and what config.json says:
- every module in a scheme compressed-tensors has (Format.ct_group): FP8 and Int8 as compressed-tensors writes them
  (native FP8's `weight_scale_inv` renamed, bytes unchanged), GPTQ and AWQ repacked losslessly into `pack-quantized`
  (Format.repack; build proves each repacked module dequantizes to exactly its source's weight);
- `quantization_config`: one config group per scheme with explicit targets (module names; a MoE layer's experts as
  one `re:` pattern — SGLang looks a FusedMoE layer up by its expert 0), `ignore` for every bf16 linear and router,
  the one block-FP8 group also targets "Linear" (SGLang 0.5.17 takes fused layers' block size from that group;
  names outrank a class target in SGLang, vLLM and compressed-tensors alike), `format` "mixed-precision" when the
  groups differ — except that SGLang 0.5.17's WNA16 MoE insists on a top-level
  "pack-quantized" (compressed_tensors_wNa16_moe.py), so a model with pack-quantized experts says that (each group
  names its own format, which SGLang, vLLM and compressed-tensors read first);
- the manifest still goes along (config.json key `mpconvert` holds its sha256) and `verify` checks the directory.
What compressed-tensors cannot say is refused (problems): experts of several formats in one MoE layer (the
mpconvert layout serves that through the shim), int8 experts (SGLang 0.5.17's compressed-tensors int8 MoE is
NPU-only), a quantized lm_head (SGLang's ParallelLMHead takes no compressed-tensors scheme), model types not tested.
"""
from __future__ import annotations

import json
import re

from .formats import FORMATS
from .layout import ModelInfo, natural_key
from .rules import Linear, Problem

# model types whose export is tested (tests/test_export.py: SGLang's engine check with the shim off, and
# compressed-tensors' own decompression; gpu/formats_serve.py on the H200); others are refused until they are
MODEL_TYPES = ("llama", "qwen3_moe")
PACK_FORMAT = "pack-quantized"
MANIFEST_KEY = "mpconvert"  # config.json: {"manifest": ..., "manifest_sha256": ...} of an exported directory


def problems(linears: list[Linear], units: dict[str, dict], info: ModelInfo) -> list[Problem]:
    fix = "build without --to compressed-tensors (the mpconvert layout serves it through the runtime shim)"
    if info.model_type not in MODEL_TYPES:
        return [Problem("export", "model", f"--to compressed-tensors is tested for {', '.join(MODEL_TYPES)}, not "
                                           f"{info.model_type}; {fix}")]
    out = []
    blocks = sorted({m.scheme.describe() for m in linears if _block_fp8(m.scheme.format, m.scheme.params)})
    if len(blocks) > 1:
        out.append(Problem("export", "model", f"block-FP8 in several schemes ({'; '.join(blocks)}): SGLang 0.5.17 "
                                              f"loads fused block-FP8 layers with the block size of the config's "
                                              f"'Linear' group, so an export holds one; {fix}"))
    for unit, spec in units.items():
        if spec.get("groups"):
            out.append(Problem("export", unit, f"{unit} mixes formats across its experts, which compressed-tensors "
                                               f"cannot express (SGLang gives a FusedMoE layer its expert 0's "
                                               f"scheme); {fix}, or give the layer's experts one format"))
    for m in linears:
        fmt, p = m.scheme.format, m.scheme.params
        if fmt == "unquantized":
            continue
        if FORMATS[fmt].ct_group(p) is None:
            out.append(Problem("export", m.name, f"{m.name} ({m.scheme.describe()}) has no compressed-tensors "
                                                 f"scheme; {fix}"))
        elif m.role.slot == "lm_head":
            out.append(Problem("export", m.name, f"{m.name} is quantized ({m.scheme.describe()}), but SGLang 0.5.17 "
                                                 f"gives lm_head no compressed-tensors scheme (it would load the "
                                                 f"quantized bytes as bf16); take lm_head from the base, or {fix}"))
        elif m.role.expert is not None and fmt == "int8":
            out.append(Problem("export", m.name, f"{m.role.unit}: int8 experts — SGLang 0.5.17's compressed-tensors "
                                                 f"W8A8-Int8 MoE runs on NPU only; take them from an FP8 or "
                                                 f"pack-quantized source, or {fix}"))
    return out


def _block_fp8(fmt: str, params: dict) -> bool:
    return fmt == "fp8" and params.get("strategy") == "block"


def _target(manifest, unit: str, members: list[str]) -> list[str]:
    """Explicit module names — and a fused unit's own SGLang name (qkv_proj, gate_up_proj): SGLang 0.5.17's Llama
    declares no packed_modules_mapping, so its compressed-tensors config matches a fused layer only by that name
    (others never see it); a MoE layer's experts as one pattern over every expert id."""
    if manifest.modules[members[0]].expert is None:
        return members + ([unit] if unit not in members else [])
    parts = "|".join(sorted({n.rsplit(".", 1)[1] for n in members}))
    return [f"re:^{re.escape(unit)}\\.\\d+\\.(?:{parts})$"]


def quantization_config(manifest) -> dict:
    """config.json's quantization_config for an exported directory, a pure function of the manifest (verify
    recomputes it)."""
    groups: dict[str, dict] = {}  # canonical JSON of the group's args → group
    ignore: list[str] = []
    pack_experts = False
    for unit, spec in manifest.units.items():
        if spec.format == "unquantized":
            ignore += _target(manifest, unit, spec.members)
            continue
        group = FORMATS[spec.format].ct_group(spec.params)
        key = json.dumps(group, sort_keys=True)
        groups.setdefault(key, {"targets": [], **group})["targets"] += _target(manifest, unit, spec.members)
        pack_experts |= group["format"] == PACK_FORMAT and manifest.modules[spec.members[0]].expert is not None
    ignore += [n for n, m in manifest.modules.items() if m.kind == "router"]
    for g in groups.values():
        if g["weights"].get("strategy") == "block":  # at most one (problems): SGLang reads fused layers' block size
            g["targets"].append("Linear")  # from the 'Linear' group; explicit names outrank it everywhere
    formats = {g["format"] for g in groups.values()}
    top = PACK_FORMAT if pack_experts else formats.pop() if len(formats) == 1 else "mixed-precision"
    return {"quant_method": "compressed-tensors", "format": top, "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": sorted(ignore, key=natural_key), "kv_cache_scheme": None, "sparsity_config": {},
            "transform_config": {}}

