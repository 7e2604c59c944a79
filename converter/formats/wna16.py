"""compressed-tensors `pack-quantized` integer weights, activations unquantized (W4A16 / W8A16; llm-compressor).

On disk: `weight_packed` i32 [out, ⌈in·bits/32⌉] (32/bits values per word along the input, first value lowest, each
stored as value + 2^(bits−1), i.e. unsigned); `weight_scale` [out, groups] (groups = ⌈in/group_size⌉, 1 for the
channel strategy); `weight_shape` i64 [2] = [out, in]; asymmetric: `weight_zero_point` i32 [⌈out·bits/32⌉, groups],
packed along the *output*, stored the same way. `weight_g_idx` i32 [in] only for actorder "group".
Dequant: W[o, i] = (q[o, i] − z[o, g(i)]) · s[o, g(i)], z = 2^(bits−1) when symmetric, g(i) = i // group_size.
SGLang 0.5.17 serves both symmetric and asymmetric on Marlin (CompressedTensorsWNA16, uint4b8 / uint4 with zero
points; FusedMoE: CompressedTensorsWNA16MoE). actorder "weight" changes only how GPTQ calibrated (no g_idx stored);
actorder "group" cannot be loaded at all: compressed-tensors ≥ 0.19, which SGLang 0.5.17 runs, rejects the config.
A module repacked from GPTQ or AWQ (Format.repack; plan.RepackJob proves it) records `repacked_from`.
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from pydantic import field_validator, model_validator

from .base import Expect, Format, Params, ceil_div, ct_config, positive_scales, register
from .gptq import MARLIN_KERNEL_MIN_K, group_size_ok, marlin_problem
from .intpack import round_to_nearest_int, unpack_cols

PACK_FORMAT = "pack-quantized"


class WNA16Params(Params):
    bits: Literal[4, 8]
    strategy: Literal["group", "channel"]
    group_size: int  # -1 for the channel strategy
    symmetric: bool
    actorder: Optional[Literal["weight"]] = None  # recorded as the producer wrote it ("static" is its alias)
    repacked_from: Optional[Literal["gptq", "gptq_v2", "awq"]] = None

    _group = field_validator("group_size")(group_size_ok)

    @model_validator(mode="after")
    def _strategy(self):
        if (self.strategy == "channel") != (self.group_size == -1):
            raise ValueError(f"strategy {self.strategy} with group_size {self.group_size}: channel means -1")
        return self


def offset(bits: int) -> int:
    """What compressed-tensors adds to a signed value before packing (and the implied zero when symmetric)."""
    return 1 << (bits - 1)


class WNA16(Format):
    name = "wna16"
    params_model = WNA16Params
    suffixes = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    value_tensors = ("weight_scale", "weight_shape")
    sglang_moe_runner = "marlin"
    # compressed_tensors_wNa16_moe.py maps the top-k ids through the layer dispatcher's expert map where one is set;
    # the shim's per-format expert groups hand it group-local ids: not proven on the GPU, so not offered
    expert_group_problem = ("its SGLang kernel (compressed-tensors WNA16 MoE) remaps expert ids through the layer's "
                            "expert map, which the shim's per-format expert groups are not proven against")
    rtn_factor, module_floor, block_error_band, logits_cosine_band = 3.0, 0.02, 0.40, 0.85

    def describe(self, p):
        group = f"g{p['group_size']}" if p["strategy"] == "group" else "channel"
        return (f"wna16 int{p['bits']} {group}{'' if p['symmetric'] else ' asym'}"
                f"{' (repacked from ' + p['repacked_from'] + ')' if p.get('repacked_from') else ''}")

    def folds(self, p):
        return p.get("repacked_from") == "awq"  # AWQ's folded scales travel with its weights

    def groups(self, p: dict, in_f: int) -> int:
        return ceil_div(in_f, p["group_size"]) if p["strategy"] == "group" else 1

    def expected(self, p, out_f, in_f):
        bits, groups = p["bits"], self.groups(p, in_f)
        exp = {"weight_packed": Expect(("I32",), (out_f, ceil_div(in_f * bits, 32))),
               "weight_scale": Expect(("F16", "BF16", "F32"), (out_f, groups)),
               "weight_shape": Expect(("I64", "I32"), (2,))}
        if not p["symmetric"]:
            exp["weight_zero_point"] = Expect(("I32",), (ceil_div(out_f * bits, 32), groups))
        return exp

    def integers(self, t: dict, p: dict, out_f: int, in_f: int):
        """The stored integers, unpacked: q [out, in] and the zero point per (output, group) [out, groups]."""
        import torch

        bits = p["bits"]
        q = unpack_cols(t["weight_packed"], bits)[:, :in_f]
        if p["symmetric"]:
            z = torch.full((out_f, self.groups(p, in_f)), offset(bits), dtype=q.dtype)
        else:
            z = unpack_cols(t["weight_zero_point"].T.contiguous(), bits)[:, :out_f].T
        return q, z

    def dequantize(self, t, p, out_f, in_f):
        import torch

        q, z = self.integers(t, p, out_f, in_f)
        g = torch.arange(in_f) // p["group_size"] if p["strategy"] == "group" else torch.zeros(in_f, dtype=torch.long)
        return ((q - z[:, g]).float() * t["weight_scale"].float()[:, g]).contiguous()

    def check_values(self, module, t, p):
        problem = positive_scales(module, "weight_scale", t["weight_scale"])
        if problem:
            return problem
        shape = [int(x) for x in np.asarray(t["weight_shape"]).reshape(-1)]
        out_f, groups = t["weight_scale"].shape
        if shape[0] != out_f or groups != self.groups(p, shape[1]):
            return (f"{module}.weight_shape says {shape}, which its weight_scale {list(t['weight_scale'].shape)} "
                    f"contradicts")
        return None

    def kernel_problem(self, p, out_parts, in_part, in_full, split_out, split_in, moe):
        if moe and not p["symmetric"]:
            # fused_moe_triton/layer.py transposes every WNA16 expert tensor but the zero point, which
            # compressed_tensors_wNa16_moe.py then decodes as AWQ's [groups, out/8] interleaved layout: the
            # [out/8, groups] zero points compressed-tensors writes fail to load (or, when square, load scrambled)
            return ("asymmetric (zero-point) experts: SGLang 0.5.17's compressed-tensors WNA16 MoE reads zero points "
                    "in another layout than compressed-tensors writes them")
        return marlin_problem(p["bits"], p["group_size"], out_parts, in_part, in_full, MARLIN_KERNEL_MIN_K, moe)

    def round_to_nearest(self, w, p):
        return round_to_nearest_int(w, p["bits"], p["group_size"], symmetric=p["symmetric"])

    def weights_args(self, p: dict) -> dict:
        """compressed-tensors QuantizationArgs of the weights (SGLang's config and the export write these)."""
        return {"num_bits": p["bits"], "type": "int", "symmetric": p["symmetric"], "dynamic": False,
                "strategy": p["strategy"], "group_size": p["group_size"] if p["strategy"] == "group" else None,
                "actorder": p.get("actorder")}

    def ct_group(self, p):
        return {"weights": self.weights_args(p), "input_activations": None, "format": PACK_FORMAT}

    def sglang_config(self, p):
        return "compressed-tensors", ct_config(self.ct_group(p))

    def sglang_methods(self, p, moe):
        return (("CompressedTensorsFusedMoEMethod", "CompressedTensorsWNA16MoE") if moe
                else ("CompressedTensorsLinearMethod", "CompressedTensorsWNA16"))


WNA16_FORMAT = register(WNA16())
