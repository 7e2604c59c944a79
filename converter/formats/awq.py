"""AWQ GEMM (AutoAWQ; gptqmodel writes the same layout bit for bit), int4 with zero points.

On disk: `qweight` i32 [in, out/8]; `qzeros` i32 [in/g, out/8]; `scales` f16/bf16 [in/g, out]. Packed along the
output dim with AutoAWQ's interleave: nibble k of word c is column 8c + [0,2,4,6,1,3,5,7][k]. Zeros stored directly.
Dequant: W[o, i] = (q[i, o] − z[i/g, o]) · s[i/g, o]. AWQ folds activation scales into the previous op (norms,
v_proj→o_proj, up_proj→down_proj): see layout.py for the coupling this forces. SGLang runs it on AWQ-Marlin.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import field_validator

from ..errors import UserError
from .base import (CT_LAYOUT, MP_LAYOUT, Expect, Format, Params, ProducerConfig, Scheme, ceil_div, parse_config,
                   positive_scales, register)
from .gptq import group_size_ok, marlin_problem
from .intpack import REPACK_FROM, pack_cols, repacked_scheme, round_to_nearest_int, unpack_cols

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# SGLang 0.5.17's AWQ-Marlin asks verify_marlin_supports_shape (marlin_utils.py: GPTQ_MARLIN_MIN_THREAD_K = 128)
# and falls back to the dequantizing AWQ kernel where it says no — which the shim refuses: so 128 binds here.
AWQ_MARLIN_MIN_K = 128


class AWQParams(Params):
    bits: Literal[4]
    group_size: int
    zero_point: Literal[True]

    _group = field_validator("group_size")(group_size_ok)


class AWQConfig(ProducerConfig):
    """AutoAWQ (w_bit, q_group_size, version) and gptqmodel (bits, group_size, format) spellings."""
    version: Optional[str] = None
    format: Optional[str] = None
    bits: Optional[int] = None
    w_bit: Optional[int] = None
    group_size: Optional[int] = None
    q_group_size: Optional[int] = None
    zero_point: bool = True


class AWQ(Format):
    name = kind = "awq"
    quant_methods = ("awq",)
    params_model = AWQParams
    suffixes = ("qweight", "qzeros", "scales")
    value_tensors = ("scales",)
    folds_scales = True
    sglang_moe_runner = "marlin"
    rtn_factor, module_floor, block_error_band, logits_cosine_band = 3.0, 0.02, 0.40, 0.85

    def scheme_of(self, module, tensors, config, where):
        return config if "qweight" in tensors else None

    def read_config(self, qc: dict, where: str) -> Scheme:
        """The one scheme every quantized module of the checkpoint has (built once, not per module)."""
        c = parse_config(AWQConfig, qc, where)
        version = (c.version or c.format or "gemm").lower()
        bits = c.bits if c.bits is not None else c.w_bit if c.w_bit is not None else 4
        gs = c.group_size if c.group_size is not None else c.q_group_size if c.q_group_size is not None else 128
        try:
            group_size_ok(gs)
        except ValueError as e:
            raise UserError(f"{where}: quantization_config: {e}") from None
        if version != "gemm":
            raise UserError(f"{where}: AWQ version {version!r} is not supported (only GEMM); re-export with "
                            f"version='gemm'")
        if bits != 4:
            raise UserError(f"{where}: AWQ with {bits} bits is not supported (AWQ-Marlin is 4-bit)")
        if not c.zero_point:
            raise UserError(f"{where}: AWQ without zero points is not supported by SGLang's AWQ-Marlin")
        return Scheme.of("awq", bits=4, group_size=gs, zero_point=True)

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

    def repack(self, p, layout=MP_LAYOUT):
        """For a compressed-tensors export: → WNA16 with zero points (the same (q − z)·s per group)."""
        if layout != CT_LAYOUT:
            return None
        return repacked_scheme(4, p["group_size"], False, "awq")

    repack_from = REPACK_FROM

    def repack_tensors(self, t, p, out_f, in_f):
        """AWQ packs along the output with its interleave; compressed-tensors packs the weight along the input and
        the zero points along the output, in plain order: unpack, transpose, repack."""
        import torch

        q = unpack_cols(t["qweight"], 4, AWQ_ORDER)  # [in, out]
        z = unpack_cols(t["qzeros"], 4, AWQ_ORDER)  # [groups, out]
        return {"weight_packed": pack_cols(q.T.contiguous(), 4), "weight_scale": t["scales"].T.contiguous(),
                "weight_zero_point": pack_cols(z, 4).T.contiguous(),
                "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}

    def kernel_problem(self, p, out_parts, in_part, in_full, split_out, split_in, moe):
        return marlin_problem(4, p["group_size"], out_parts, in_part, in_full, AWQ_MARLIN_MIN_K, moe)

    def check_values(self, module, t, p):
        return positive_scales(module, "scales", t["scales"])

    def round_to_nearest(self, w, p):
        return round_to_nearest_int(w, 4, p["group_size"], symmetric=False)

    def sglang_config(self, p):
        return "awq_marlin", {"quant_method": "awq", "bits": 4, "group_size": p["group_size"], "zero_point": True,
                              "modules_to_not_convert": None}

    def sglang_methods(self, p, moe):
        # AWQ-Marlin: in 0.5.17 the dequantizing fallback returns the same linear method class with another scheme
        return ("AWQMoEMethod", "AWQMoEScheme") if moe else ("AWQLinearMethod", "AWQMarlinLinearScheme")


AWQ_FORMAT = register(AWQ())
