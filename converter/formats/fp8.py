"""FP8 E4M3 weights, two on-disk layouts with the same math (w · scale, broadcast or per 2-D block).

- native (`quant_method: fp8`, DeepSeek/Qwen style): `weight` f8e4m3 + `weight_scale_inv` f32
  [⌈out/bn⌉, ⌈in/bk⌉] with `weight_block_size` [bn, bk], or per-tensor `weight_scale` f32 [] / [1];
  `input_scale` only when `activation_scheme: static`. Despite its name `weight_scale_inv` is a multiplier.
- compressed-tensors (`float-quantized`): `weight` f8e4m3 + `weight_scale` (model dtype) [1] per tensor,
  [out, 1] per channel, or [⌈out/bn⌉, ⌈in/bk⌉] per block; `input_scale` [1] when activations are static.
SGLang trap: the Llama-family loader (0.5.17: `LlamaForCausalLM` and its subclasses) renames `weight_scale_inv` →
`weight_scale`, finds no such parameter on a native block-FP8 layer and skips it silently: the model loads and emits
garbage (seen on GPU). Both layouts have the same math and the same f32 block scales, so for those model types build
writes native block FP8 in the compressed-tensors layout: the scale tensor renamed `weight_scale`, bytes unchanged,
`converted_from: native` in the manifest. SGLang then binds it to its compressed-tensors block-FP8 kernel.
"""
from __future__ import annotations

from .base import FLOAT_DTYPES, Expect, Format, ceil_div, register


# model_type → SGLang 0.5.17's loader renames `weight_scale_inv` (models/llama.py; Mistral inherits it; qwen3_5.py)
RENAMES_SCALE_INV = ("llama", "mistral", "qwen3_5")


class FP8(Format):
    name = "fp8"

    def describe(self, p):
        blk = f" {p['block'][0]}x{p['block'][1]}" if p["strategy"] == "block" else ""
        was = f", from {p['converted_from']}" if p.get("converted_from") else ""
        return f"fp8 {p['strategy']}{blk} act={p['activation']} ({p['layout']}{was})"

    @staticmethod
    def scale_name(p) -> str:
        return "weight_scale_inv" if p["layout"] == "native" and p["strategy"] == "block" else "weight_scale"

    def output_params(self, p, model_type):
        if p["layout"] == "native" and p["strategy"] == "block" and model_type in RENAMES_SCALE_INV:
            return {**p, "layout": "ct", "converted_from": "native"}
        return p

    def output_suffix(self, suffix, p, model_type):
        if suffix == self.scale_name(p):
            return self.scale_name(self.output_params(p, model_type))
        return suffix

    def expected(self, p, out_f, in_f):
        native = p["layout"] == "native"
        sdt = ("F32",) if native else FLOAT_DTYPES
        if p["strategy"] == "block":
            bn, bk = p["block"]
            scale = Expect(sdt, (ceil_div(out_f, bn), ceil_div(in_f, bk)))
        elif p["strategy"] == "channel":
            scale = Expect(sdt, (out_f, 1), ((out_f,),))
        else:
            scale = Expect(sdt, (1,), ((),))
        exp = {"weight": Expect(("F8_E4M3",), (out_f, in_f)), self.scale_name(p): scale}
        if p["activation"] == "static":
            exp["input_scale"] = Expect(sdt, (1,), ((),))
        return exp

    def dequantize(self, t, p, out_f, in_f):
        w = t["weight"].float()
        s = t[self.scale_name(p)].float()
        if p["strategy"] == "block":
            bn, bk = p["block"]
            s = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:out_f, :in_f]
        elif p["strategy"] == "channel":
            s = s.reshape(out_f, 1)
        else:
            s = s.reshape(())
        return w * s

    def tp_problem(self, p, out_part, in_part):
        if p["strategy"] != "block":
            return None
        bn, bk = p["block"]
        if out_part % bn:
            return f"output partition {out_part} is not a multiple of the FP8 block {bn}"
        if in_part % bk:
            return f"input partition {in_part} is not a multiple of the FP8 block {bk}"
        return None

    def sglang_config(self, p):
        if p["layout"] == "native":
            cfg = {"quant_method": "fp8", "activation_scheme": "dynamic" if p["activation"] == "none"
                   else p["activation"], "fmt": "e4m3"}
            if p["strategy"] == "block":
                cfg["weight_block_size"] = list(p["block"])
            return "fp8", cfg
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": p["strategy"],
                   "block_structure": list(p["block"]) if p["strategy"] == "block" else None}
        acts = None
        if p["activation"] != "none":
            dynamic = p["activation"] == "dynamic"
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic,
                    "strategy": ("group" if p["strategy"] == "block" else "token") if dynamic else "tensor",
                    "group_size": p["block"][1] if dynamic and p["strategy"] == "block" else None}
        return "compressed-tensors", {"quant_method": "compressed-tensors", "format": "float-quantized",
                                      "quantization_status": "compressed", "ignore": [],
                                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                                    "input_activations": acts,
                                                                    "format": "float-quantized"}}}

    def sglang_methods(self, p, moe):
        if p["layout"] == "native":
            return ("Fp8MoEMethod", None) if moe else ("Fp8LinearMethod", None)
        return (("CompressedTensorsFusedMoEMethod", "CompressedTensorsW8A8Fp8MoE") if moe
                else ("CompressedTensorsLinearMethod", "CompressedTensorsW8A8Fp8"))

    def check_values(self, module, t, p):
        s = t[self.scale_name(p)].float()
        if not bool((s > 0).all()) or not bool(s.isfinite().all()):
            return f"{module}.{self.scale_name(p)} has non-positive or non-finite scales"
        return None


FP8_FORMAT = register(FP8())
