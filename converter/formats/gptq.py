"""GPTQ (gptqmodel / auto-gptq), int4/int8 weight-only.

On disk: `qweight` i32 [in/pf, out] (pf = 32/bits values per word, first value in the lowest bits, packed along in);
`qzeros` i32 [groups, out/pf]; `scales` f16/bf16 [groups, out]; `g_idx` i32 [in] (permuted when desc_act).
checkpoint_format "gptq" (v1) stores zero−1 (sym 4-bit ⇒ 0x77777777); "gptq_v2" stores the zero itself.
SGLang's GPTQ-Marlin reads only bits/group_size/desc_act/sym and decodes v1; Marlin takes only symmetric 4/8-bit,
so asymmetric GPTQ has no native path and is refused. v2 is rewritten to v1 exactly (zero−1) or refused.
Dequant: W[o, i] = (q[i, o] − z[g_idx[i], o]) · s[g_idx[i], o], with z = stored+1 for v1.
"""
from __future__ import annotations

from ..errors import UserError
from .base import Expect, Format, ceil_div, register
from .intpack import pack_cols, unpack_cols, unpack_rows

MARLIN_MIN_N, MARLIN_MIN_K = 64, 128  # SGLang marlin_utils: GPTQ_MARLIN_MIN_THREAD_N / _K


def marlin_tp_problem(bits: int, group_size: int, out_part: int, in_part: int) -> str | None:
    """Shared by GPTQ and AWQ: SGLang's Marlin kernels' shape rules for one TP partition."""
    if out_part % MARLIN_MIN_N:
        return f"output partition {out_part} is not a multiple of {MARLIN_MIN_N} (Marlin tile)"
    if in_part % MARLIN_MIN_K:
        return f"input partition {in_part} is not a multiple of {MARLIN_MIN_K} (Marlin tile)"
    if group_size > 0 and in_part % group_size:
        return f"input partition {in_part} splits a quantization group of {group_size}"
    return None


class GPTQ(Format):
    name = "gptq"
    sglang_moe_runner = "marlin"

    @staticmethod
    def params_from_config(qc: dict, where: str) -> dict:
        bits, gs = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        sym, desc_act = bool(qc.get("sym", True)), bool(qc.get("desc_act", False))
        if fmt not in ("gptq", "gptq_v2"):
            raise UserError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (only gptq and gptq_v2); "
                            f"re-export it with format='gptq'")
        if bits not in (4, 8):
            raise UserError(f"{where}: GPTQ with {bits} bits has no native SGLang Marlin kernel (4 or 8 only)")
        if not sym:
            raise UserError(f"{where}: asymmetric GPTQ (sym=false) has no native SGLang kernel (Marlin is symmetric "
                            f"only); re-quantize with sym=True or take these modules from another source")
        if qc.get("dynamic"):
            raise UserError(f"{where}: GPTQ `dynamic` per-module overrides are not supported yet; use a uniform "
                            f"GPTQ checkpoint")
        return {"bits": bits, "group_size": gs, "desc_act": desc_act, "sym": sym, "checkpoint_format": fmt}

    def describe(self, p):
        return (f"gptq int{p['bits']} g{p['group_size']}{' desc_act' if p['desc_act'] else ''}"
                f"{' (v2→v1)' if p.get('converted_from') else ''}")

    def expected(self, p, out_f, in_f):
        pf, gs = 32 // p["bits"], p["group_size"]
        groups = ceil_div(in_f, gs) if gs > 0 else 1
        return {"qweight": Expect(("I32",), (in_f // pf, out_f)), "qzeros": Expect(("I32",), (groups, out_f // pf)),
                "scales": Expect(("F16", "BF16"), (groups, out_f)), "g_idx": Expect(("I32",), (in_f,))}

    def zeros(self, qzeros, p):
        z = unpack_cols(qzeros, p["bits"])
        return z + 1 if p["checkpoint_format"] == "gptq" else z

    def dequantize(self, t, p, out_f, in_f):
        q = unpack_rows(t["qweight"], p["bits"])  # [in, out]
        g = t["g_idx"].long()
        z = self.zeros(t["qzeros"], p)[g]  # [in, out]
        s = t["scales"].float()[g]
        return ((q - z).float() * s).T.contiguous()

    def check_values(self, module, t, p):
        groups = t["scales"].shape[0]
        g = t["g_idx"]
        if int(g.min()) < 0 or int(g.max()) >= groups:
            return f"{module}.g_idx has values outside [0, {groups})"
        if not p["desc_act"] and p["group_size"] > 0:
            import torch

            if not torch.equal(g.long(), torch.arange(g.numel()) // p["group_size"]):
                return f"{module}.g_idx is permuted but desc_act is false"
        if p["sym"] and p["checkpoint_format"] == "gptq":
            mid = 1 << (p["bits"] - 1)
            if not bool((self.zeros(t["qzeros"], p) == mid).all()):
                return (f"{module}.qzeros: a symmetric v1 checkpoint stores zero−1 = {mid - 1} everywhere, found "
                        f"other values (v2 zeros labelled v1?)")
        return None

    def rewrite(self, suffix, p):
        if suffix != "qzeros" or p["checkpoint_format"] != "gptq_v2":
            return None
        bits = p["bits"]

        def v2_to_v1(qzeros):
            z = unpack_cols(qzeros, bits)
            if bool((z == 0).any()):
                raise UserError("gptq_v2 zero point 0 cannot be stored as v1 (zero−1 < 0); re-export as v1")
            return pack_cols(z - 1, bits)

        return v2_to_v1

    def output_params(self, p, model_type):
        if p["checkpoint_format"] == "gptq_v2":
            return {**p, "checkpoint_format": "gptq", "converted_from": "gptq_v2"}
        return p

    def tp_problem(self, p, out_part, in_part):
        return marlin_tp_problem(p["bits"], p["group_size"], out_part, in_part)

    def sglang_config(self, p):
        return "gptq_marlin", {"quant_method": "gptq", "bits": p["bits"], "group_size": p["group_size"],
                               "desc_act": p["desc_act"], "sym": p["sym"], "lm_head": False}

    def sglang_methods(self, p, moe):
        return ("GPTQMarlinMoEMethod", "GPTQMarlinMoEScheme") if moe else ("GPTQMarlinLinearMethod", None)


GPTQ_FORMAT = register(GPTQ())
