"""W8A8 int8: per-channel symmetric int8 weights, dynamic per-token int8 activations.

On disk (compressed-tensors `int-quantized`, and SGLang's own `w8a8_int8` — the same tensors): `weight` i8
[out, in] + `weight_scale` [out, 1] (bf16/f16 from llm-compressor, f32 from SGLang-native exports).
Dequant: W = w · scale. SmoothQuant-style producers fold activation scales into the preceding norms (layout.py).
SGLang: W8A8Int8Config (dense and FusedMoE); compressed-tensors' own int8 MoE path is NPU-only on 0.5.17.
"""
from __future__ import annotations

from typing import Literal

from .base import CT_LAYOUT, FLOAT_DTYPES, MP_LAYOUT, Expect, Format, Params, Scheme, positive_scales, register


# SGLang runs a dense W8A8-Int8 layer (W8A8Int8LinearMethod, and compressed-tensors' W8A8Int8 scheme alike) on
# sgl_kernel's int8_scaled_mm, whose TORCH_CHECKs want K a multiple of 16 and N of 8 ("mat_a.size(1) must be multiple
# of 16 for memory alignment", "mat_b.size(1) must be multiple of 8": in the sm90 library of SGLang 0.5.17's bundle)
# and fail the first forward otherwise — a layer loads first. MoE experts run Triton's fused_moe: any shape.
INT8_GEMM_K, INT8_GEMM_N = 16, 8


class Int8Params(Params):
    layout: Literal["ct", "native"]
    activation: Literal["dynamic"]


class Int8(Format):
    name = "int8"
    kind = "w8a8_int8"
    quant_methods = ("w8a8_int8",)  # SGLang's own layout; compressed-tensors int8 is read by compressed_tensors.py
    params_model = Int8Params
    suffixes = ("weight", "weight_scale")
    value_tensors = ("weight_scale",)
    rtn_factor, module_floor, block_error_band, logits_cosine_band = 1.5, 1e-3, 0.10, 0.99

    def describe(self, p):
        return f"int8 w8a8 per-channel act={p['activation']} ({p['layout']})"

    def scheme_of(self, module, tensors, config, where):
        w = tensors.get("weight")
        return Scheme.of("int8", layout="native", activation="dynamic") if w is not None and w.dtype == "I8" else None

    def expected(self, p, out_f, in_f):
        # [out, 1] only: SGLang's ChannelQuantScaleParameter asserts that shape when loading (a flat [out] crashes it)
        return {"weight": Expect(("I8",), (out_f, in_f)), "weight_scale": Expect(FLOAT_DTYPES, (out_f, 1))}

    def dequantize(self, t, p, out_f, in_f):
        return t["weight"].float() * t["weight_scale"].float().reshape(out_f, 1)

    def kernel_problem(self, p, out_parts, in_part, in_full, split_out, split_in, moe):
        if moe:
            return None
        needs = f"(SGLang's int8 GEMM, sgl_kernel int8_scaled_mm, needs K % {INT8_GEMM_K} and N % {INT8_GEMM_N})"
        if in_part % INT8_GEMM_K:
            return f"input size {in_part} is not a multiple of {INT8_GEMM_K} {needs}"
        if sum(out_parts) % INT8_GEMM_N:
            return f"output size {sum(out_parts)} is not a multiple of {INT8_GEMM_N} {needs}"
        return None

    def quantize_activations(self, x, p, t):
        # SGLang's per_token_quant_int8: symmetric, scale = absmax / 127 per token, round to nearest
        s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-10)
        return (x / s).round().clamp(-128, 127) * s

    def sglang_config(self, p):
        # both layouts hold the same tensors; SGLang's own W8A8-Int8 also runs FusedMoE (compressed-tensors' int8
        # MoE path is NPU-only in 0.5.17)
        return "w8a8_int8", {"quant_method": "w8a8_int8"}

    def output_params(self, p, model_type, layout=MP_LAYOUT):
        return {**p, "layout": "ct"} if layout == CT_LAYOUT else p  # the same tensors in both layouts

    def ct_group(self, p):
        return {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                      "strategy": "token"},
                "format": "int-quantized"}

    def sglang_methods(self, p, moe):
        return ("W8A8Int8MoEMethod", None) if moe else ("W8A8Int8LinearMethod", None)

    def ct_methods(self, p, moe):
        return ("CompressedTensorsFusedMoEMethod", None) if moe else ("CompressedTensorsLinearMethod",
                                                                       "CompressedTensorsW8A8Int8")

    def check_values(self, module, t, p):
        return positive_scales(module, "weight_scale", t["weight_scale"])

    def round_to_nearest(self, w, p):
        s = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        return (w / s).round().clamp(-128, 127) * s


INT8_FORMAT = register(Int8())
