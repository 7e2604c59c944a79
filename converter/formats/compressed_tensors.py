"""compressed-tensors configs (llm-compressor): map `config_groups` to fp8 / int8 schemes per module.

A group has `targets` (class names such as "Linear", exact names, or `re:` regexes), `weights` and
`input_activations` args, and a `format` (or the top-level one). `ignore` lists modules left unquantized.
Supported: float 8-bit weights (tensor/channel/block; activations none/dynamic/static) and int 8-bit symmetric
per-channel weights with dynamic per-token activations. W4A16 `pack-quantized`, sparsity and transforms are refused.
"""
from __future__ import annotations

import re

from ..errors import UserError
from .base import Scheme


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    if target in ("Linear", "nn.Linear", "torch.nn.Linear"):
        return True  # every module we ask about is a linear
    return module == target or module.endswith("." + target)


def scheme_of_group(group: dict, top_format: str | None, where: str) -> Scheme:
    w, a = group.get("weights") or {}, group.get("input_activations")
    fmt = group.get("format") or top_format
    act = "none" if not a else ("dynamic" if a.get("dynamic") else "static")
    if w.get("type") == "float" and w.get("num_bits") == 8:
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise UserError(f"{where}: compressed-tensors FP8 weight strategy {strategy!r} is not supported")
        if a and a.get("type") != "float":
            raise UserError(f"{where}: FP8 weights with non-FP8 activations are not supported")
        block = list(w.get("block_structure") or []) if strategy == "block" else None
        return Scheme.of("fp8", layout="ct", strategy=strategy, block=block, activation=act)
    if w.get("type") == "int" and w.get("num_bits") == 8:
        if w.get("strategy") != "channel" or not w.get("symmetric", True):
            raise UserError(f"{where}: int8 weights must be symmetric per-channel for SGLang's W8A8-Int8 kernel "
                            f"(found strategy={w.get('strategy')!r}, symmetric={w.get('symmetric')})")
        if act != "dynamic" or a.get("strategy") != "token":
            raise UserError(f"{where}: int8 needs dynamic per-token activations for SGLang's W8A8-Int8 kernel "
                            f"(found {act}); re-quantize with scheme W8A8")
        return Scheme.of("int8", layout="ct", activation="dynamic")
    raise UserError(f"{where}: compressed-tensors scheme {w.get('type')}{w.get('num_bits')} (format {fmt!r}) is not "
                    f"supported yet; supported: FP8 (tensor/channel/block) and W8A8 int8")


class CompressedTensorsConfig:
    def __init__(self, qc: dict, where: str):
        self.where = where
        if qc.get("sparsity_config"):
            raise UserError(f"{where}: compressed-tensors sparsity is not supported; use a dense quantized source")
        if qc.get("transform_config"):
            raise UserError(f"{where}: compressed-tensors transforms are not supported")
        if qc.get("quantization_status", "compressed") != "compressed":
            raise UserError(f"{where}: quantization_status is {qc.get('quantization_status')!r}; save with "
                            f"save_compressed=True")
        self.ignore = list(qc.get("ignore") or [])
        self.groups = [(name, list(g.get("targets") or []), scheme_of_group(g, qc.get("format"), f"{where} {name}"))
                       for name, g in sorted((qc.get("config_groups") or {}).items())]
        if not self.groups:
            raise UserError(f"{where}: compressed-tensors config has no config_groups")

    def scheme_for(self, module: str) -> Scheme | None:
        if any(_matches(t, module) for t in self.ignore):
            return None
        # a name/regex target is more specific than a class target, as in compressed-tensors itself
        for specific in (True, False):
            for _, targets, scheme in self.groups:
                for t in targets:
                    if (t not in ("Linear", "nn.Linear", "torch.nn.Linear")) == specific and _matches(t, module):
                        return scheme
        return None
