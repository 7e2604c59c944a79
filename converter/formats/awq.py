"""AWQ GEMM (AutoAWQ; gptqmodel writes the same layout bit for bit), int4 with zero points.

On disk: `qweight` i32 [in, out/8]; `qzeros` i32 [in/g, out/8]; `scales` f16/bf16 [in/g, out]. Packed along the
output dim with AutoAWQ's interleave: nibble k of word c is column 8c + [0,2,4,6,1,3,5,7][k]. Zeros stored directly.
Dequant: W[o, i] = (q[i, o] − z[i/g, o]) · s[i/g, o]. AWQ folds activation scales into the previous op (norms,
v_proj→o_proj, up_proj→down_proj): see layout.py for the coupling this forces. SGLang runs it on AWQ-Marlin.
"""
from __future__ import annotations

from ..errors import UserError
from .base import Expect, Format, ceil_div, register
from .gptq import marlin_tp_problem
from .intpack import unpack_cols

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


class AWQ(Format):
    name = "awq"
    folds_scales = True
    sglang_moe_runner = "marlin"

    @staticmethod
    def params_from_config(qc: dict, where: str) -> dict:
        version = str(qc.get("version") or qc.get("format") or "gemm").lower()
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        gs = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if version != "gemm":
            raise UserError(f"{where}: AWQ version {version!r} is not supported (only GEMM); re-export with "
                            f"version='gemm'")
        if bits != 4:
            raise UserError(f"{where}: AWQ with {bits} bits is not supported (AWQ-Marlin is 4-bit)")
        if not qc.get("zero_point", True):
            raise UserError(f"{where}: AWQ without zero points is not supported by SGLang's AWQ-Marlin")
        return {"bits": 4, "group_size": gs, "zero_point": True}

    def describe(self, p):
        return f"awq int4 g{p['group_size']}"

    def expected(self, p, out_f, in_f):
        groups = ceil_div(in_f, p["group_size"]) if p["group_size"] > 0 else 1
        return {"qweight": Expect(("I32",), (in_f, out_f // 8)), "qzeros": Expect(("I32",), (groups, out_f // 8)),
                "scales": Expect(("F16", "BF16"), (groups, out_f))}

    def dequantize(self, t, p, out_f, in_f):
        q = unpack_cols(t["qweight"], 4, AWQ_ORDER)  # [in, out]
        z = unpack_cols(t["qzeros"], 4, AWQ_ORDER)  # [groups, out]
        gs = p["group_size"] if p["group_size"] > 0 else in_f
        rows = (q.shape[0] + gs - 1) // gs
        z = z.repeat_interleave(gs, 0)[: q.shape[0]] if rows else z
        s = t["scales"].float().repeat_interleave(gs, 0)[: q.shape[0]]
        return ((q - z).float() * s).T.contiguous()

    def tp_problem(self, p, out_part, in_part):
        return marlin_tp_problem(4, p["group_size"], out_part, in_part)

    def sglang_config(self, p):
        return "awq_marlin", {"quant_method": "awq", "bits": 4, "group_size": p["group_size"], "zero_point": True,
                              "modules_to_not_convert": None}

    def sglang_methods(self, p, moe):
        # AWQ-Marlin: in 0.5.17 the dequantizing fallback returns the same linear method class with another scheme
        return ("AWQMoEMethod", "AWQMoEScheme") if moe else ("AWQLinearMethod", "AWQMarlinLinearScheme")


AWQ_FORMAT = register(AWQ())
