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

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..errors import UserError
from .base import (CT_LAYOUT, FLOAT_DTYPES, MP_LAYOUT, Expect, Format, Params, ProducerConfig, Scheme, ceil_div,
                   ct_config, parse_config, positive_scales, register)


# model_type → SGLang 0.5.17's loader renames `weight_scale_inv` (models/llama.py; Mistral inherits it; qwen3_5.py)
RENAMES_SCALE_INV = ("llama", "mistral", "qwen3_5")


class FP8Params(Params):
    layout: Literal["ct", "native"]
    strategy: Literal["tensor", "channel", "block"]
    block: Optional[list[int]]
    activation: Literal["none", "dynamic", "static"]
    converted_from: Optional[Literal["native"]] = None

    @model_validator(mode="after")
    def _block(self):
        if (self.strategy == "block") != (self.block is not None):
            raise ValueError("block is [block_n, block_k] exactly when strategy is block")
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise ValueError(f"block {self.block} must be two positive integers")
        return self


class NativeFP8Config(ProducerConfig):
    """SGLang's / DeepSeek's `quant_method: fp8`."""
    activation_scheme: Literal["dynamic", "static"] = "dynamic"
    fmt: Literal["e4m3"] = "e4m3"
    weight_block_size: Optional[list[int]] = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _block(self):
        if self.weight_block_size is not None and min(self.weight_block_size) < 1:
            raise ValueError(f"weight_block_size {self.weight_block_size} must be two positive integers")
        return self


FP8_MAX = 448.0  # largest finite E4M3 value


class FP8(Format):
    name = kind = "fp8"
    quant_methods = ("fp8",)  # the native layout; compressed-tensors FP8 is read by formats/compressed_tensors.py
    params_model = FP8Params
    suffixes = ("weight", "weight_scale", "weight_scale_inv", "input_scale")
    rtn_factor, module_floor, block_error_band, logits_cosine_band = 1.5, 1e-3, 0.25, 0.97

    def read_config(self, qc: dict, where: str) -> dict:
        c = parse_config(NativeFP8Config, qc, where)
        return {"activation": c.activation_scheme, "block": c.weight_block_size}

    def scheme_of(self, module, tensors, config, where):
        w = tensors.get("weight")
        if w is None or w.dtype != "F8_E4M3":
            return None
        if "weight_scale_inv" in tensors:
            if not config["block"]:
                raise UserError(f"{where}: {module} has weight_scale_inv but config.json has no weight_block_size")
            return Scheme.of("fp8", layout="native", strategy="block", block=list(config["block"]),
                             activation=config["activation"])
        return Scheme.of("fp8", layout="native", strategy="tensor", block=None, activation=config["activation"])

    def value_suffixes(self, p) -> tuple[str, ...]:
        return (self.scale_name(p),) + (("input_scale",) if p["activation"] == "static" else ())

    def describe(self, p):
        blk = f" {p['block'][0]}x{p['block'][1]}" if p["strategy"] == "block" else ""
        was = f", from {p['converted_from']}" if p.get("converted_from") else ""
        return f"fp8 {p['strategy']}{blk} act={p['activation']} ({p['layout']}{was})"

    @staticmethod
    def scale_name(p) -> str:
        return "weight_scale_inv" if p["layout"] == "native" and p["strategy"] == "block" else "weight_scale"

    def output_params(self, p, model_type, layout=MP_LAYOUT):
        if p["layout"] == "native" and (layout == CT_LAYOUT or p["strategy"] == "block" and
                                        model_type in RENAMES_SCALE_INV):
            return {**p, "layout": "ct", "converted_from": "native"}
        return p

    def output_suffix(self, suffix, p, model_type, layout=MP_LAYOUT):
        if suffix == self.scale_name(p):
            return self.scale_name(self.output_params(p, model_type, layout))
        return suffix

    def expected(self, p, out_f, in_f):
        native = p["layout"] == "native"
        sdt = ("F32",) if native else FLOAT_DTYPES
        if p["strategy"] == "block":
            bn, bk = p["block"]
            scale = Expect(sdt, (ceil_div(out_f, bn), ceil_div(in_f, bk)))
        elif p["strategy"] == "channel":
            scale = Expect(sdt, (out_f, 1))  # SGLang's loader asserts [out, 1]; a flat [out] crashes it
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

    def kernel_problem(self, p, out_parts, in_part, in_full, split_out, split_in, moe):
        """SGLang 0.5.17's block-FP8 shape rules (fp8.py / fp8_utils.validate_fp8_block_shape /
        compressed_tensors_w8a8_fp8_moe.py): a row-split input, every column-split or fused output part (a fused
        layer at TP=1 too: compressed-tensors exempts its last part there), and an expert's intermediate size are
        whole blocks; and, beyond what SGLang checks at load, the input as a rank holds it, which the activation
        quantization splits into groups of block_k (fp8_kernel.per_token_group_quant_fp8)."""
        if p["strategy"] != "block":
            return None
        bn, bk = p["block"]
        if split_in and in_part % bk:
            what = "expert intermediate size" if moe else "input size per rank"
            return f"{what} {in_part} is not a multiple of the FP8 block {bk}"
        if moe:  # gate/up: the intermediate size per partition; down's output (the hidden size) is not checked
            checked = out_parts if len(out_parts) > 1 else []
        elif split_out:
            checked = out_parts
        else:
            checked = [] if len(out_parts) == 1 else out_parts if p["layout"] == "native" else out_parts[:-1]
        for o in checked:
            if o % bn:
                what = "expert intermediate size" if moe else "output part" + (" per rank" if split_out else "")
                return f"{what} {o} (of {out_parts}) is not a multiple of the FP8 block {bn}"
        if p["activation"] != "none" and in_part % bk:
            # loads, then every forward fails: the block GEMM quantizes activations per token and group of bk inputs
            # (per_token_group_quant_fp8 asserts K % bk) — found on the GPU with SmolLM2's gate_up (K 576),
            # docs/gpu-results.md §10
            return (f"input size {in_part} is not a multiple of the FP8 block {bk}: SGLang quantizes the activations "
                    f"in groups of {bk} inputs")
        return None

    def sglang_config(self, p):
        if p["layout"] == "native":
            cfg = {"quant_method": "fp8", "activation_scheme": "dynamic" if p["activation"] == "none"
                   else p["activation"], "fmt": "e4m3"}
            if p["strategy"] == "block":
                cfg["weight_block_size"] = list(p["block"])
            return "fp8", cfg
        return "compressed-tensors", ct_config(self.ct_group(p))

    def ct_group(self, p):
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": p["strategy"],
                   "block_structure": list(p["block"]) if p["strategy"] == "block" else None}
        acts = None
        if p["activation"] != "none":
            dynamic = p["activation"] == "dynamic"
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic,
                    "strategy": ("group" if p["strategy"] == "block" else "token") if dynamic else "tensor",
                    "group_size": p["block"][1] if dynamic and p["strategy"] == "block" else None}
        return {"weights": weights, "input_activations": acts, "format": "float-quantized"}

    def sglang_methods(self, p, moe):
        if p["layout"] == "native":
            return ("Fp8MoEMethod", None) if moe else ("Fp8LinearMethod", None)
        return (("CompressedTensorsFusedMoEMethod", "CompressedTensorsW8A8Fp8MoE") if moe
                else ("CompressedTensorsLinearMethod", "CompressedTensorsW8A8Fp8"))

    def quantize_activations(self, x, p, t):
        """SGLang's FP8 activation quantization: static — one scale (`input_scale`) for the tensor; dynamic — per token
        for per-tensor/channel weights, per token and group of block_k inputs for block weights; none — weight-only."""
        import torch

        if p["activation"] == "none":
            return x
        fmax = torch.finfo(torch.float8_e4m3fn).max
        if p["activation"] == "static":
            s = t["input_scale"].float().reshape(())
            return (x / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn).float() * s
        if p["strategy"] == "block":
            bk = p["block"][1]
            pad = -x.shape[-1] % bk
            g = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, bk)
            s = (g.abs().amax(-1, keepdim=True) / fmax).clamp(min=1e-12)
            q = (g / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn).float() * s
            return q.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]
        s = (x.abs().amax(-1, keepdim=True) / fmax).clamp(min=1e-12)
        return (x / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn).float() * s

    def round_to_nearest(self, w, p):
        import torch

        def cast(x, s):
            return (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s

        if p["strategy"] == "tensor":
            return cast(w, w.abs().amax().clamp(min=1e-12) / FP8_MAX)
        if p["strategy"] == "channel":
            return cast(w, w.abs().amax(1, keepdim=True).clamp(min=1e-12) / FP8_MAX)
        (bn, bk), (out_f, in_f) = p["block"], w.shape
        x = torch.nn.functional.pad(w, (0, -in_f % bk, 0, -out_f % bn))
        xb = x.reshape(x.shape[0] // bn, bn, x.shape[1] // bk, bk)
        s = xb.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / FP8_MAX
        return cast(xb, s).reshape(x.shape)[:out_f, :in_f]

    def check_values(self, module, t, p):
        for suffix in self.value_suffixes(p):
            problem = positive_scales(module, suffix, t[suffix])
            if problem:
                return problem
        return None


FP8_FORMAT = register(FP8())
