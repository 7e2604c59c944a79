"""Unquantized (bf16/fp16/fp32) weights: `weight` [out, in] (+ `bias`)."""
from __future__ import annotations

from typing import Literal

from ..layout import EXTRA_TENSORS
from .base import FLOAT_DTYPES, Expect, Format, Params, Scheme, register


class UnquantizedParams(Params):
    dtype: Literal["BF16", "F16", "F32"]


class Unquantized(Format):
    name = kind = "unquantized"
    params_model = UnquantizedParams
    suffixes = ("weight",)

    def describe(self, p):
        return f"unquantized {p['dtype'].lower()}"

    def scheme_of(self, module, tensors, config, where):
        """Any source's plain float module (ignored layers, lm_head, routers, norms) — asked before its reader."""
        w = tensors.get("weight")
        if w is None or w.dtype not in FLOAT_DTYPES or any(s != "weight" and s not in EXTRA_TENSORS for s in tensors):
            return None
        return _FLOAT_SCHEMES[w.dtype]

    def expected(self, p, out_f, in_f):
        return {"weight": Expect((p["dtype"],) if p.get("dtype") else FLOAT_DTYPES, (out_f, in_f))}

    def dequantize(self, t, p, out_f, in_f):
        return t["weight"].float()

    def sglang_config(self, p):
        return None

    def sglang_methods(self, p, moe):
        return ("UnquantizedFusedMoEMethod", None) if moe else ("UnquantizedLinearMethod", None)


UNQUANTIZED = register(Unquantized())
_FLOAT_SCHEMES = {d: Scheme.of("unquantized", dtype=d) for d in FLOAT_DTYPES}  # asked for 178k modules at V3 size
