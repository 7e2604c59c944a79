"""GPTQ (gptqmodel / auto-gptq), int4/int8 weight-only.

On disk: `qweight` i32 [in/pf, out] (pf = 32/bits values per word, first value in the lowest bits, packed along in);
`qzeros` i32 [groups, out/pf]; `scales` f16/bf16 [groups, out]; `g_idx` i32 [in] (permuted when desc_act).
checkpoint_format "gptq" (v1) stores zero−1 (sym 4-bit ⇒ 0x77777777); "gptq_v2" stores the zero itself. gptqmodel
writes v1 as the v2 *word* minus 0x11111111 and reads it back by adding it (a zero of 0 borrows from its neighbour),
so v1 zeros are decoded word-wise here too — the producer's own reading, exact for every zero.
SGLang's GPTQ-Marlin reads only bits/group_size/desc_act/sym and decodes v1; it is symmetric only. Symmetric v2 is
rewritten to v1 exactly (zero−1) or refused. Asymmetric GPTQ is repacked losslessly into compressed-tensors WNA16
with zero points (formats/wna16.py; Marlin with zero points): word transposes only, where g_idx is the identity
grouping; with a desc_act permutation it has no SGLang kernel (compressed-tensors dropped actorder "group").
Dequant: W[o, i] = (q[i, o] − z[g_idx[i], o]) · s[g_idx[i], o].
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from pydantic import field_validator

from ..errors import UserError
from .base import (CT_LAYOUT, MP_LAYOUT, Expect, Format, Params, ProducerConfig, Scheme, ceil_div, parse_config,
                   positive_scales, register)
from .intpack import REPACK_FROM, pack_cols, repacked_scheme, round_to_nearest_int, unpack_cols, unpack_rows

# SGLang 0.5.17's Marlin kernels (kernels/jit/csrc/gemm/marlin/gptq_marlin.cuh and marlin_moe/moe_wna16_marlin.cuh):
# a problem runs on a thread config whose thread_k divides K and thread_n divides N. The dense kernel's configs
# (thread_k, thread_n) are (128, 128), (64, 128), (128, 64), (64, 256): K and N multiples of 64, and one of them of
# 128; the MoE kernel's smallest thread_n is 128. GPTQ-Marlin runs whatever the
# kernel takes: SGLang computes its Python-side shape check (check_marlin_supports_shape, K % 128) and ignores it.
MARLIN_MIN_N, MARLIN_MOE_MIN_N, MARLIN_KERNEL_MIN_K = 64, 128, 64
MARLIN_WIDE_TILE = 128  # a dense Marlin GEMM needs N or K a multiple of this (its thread tiles; see marlin_problem)


def marlin_problem(bits: int, group_size: int, out_parts: list[int], in_part: int, in_full: int,
                   min_k: int, moe: bool = False) -> str | None:
    """Shared by GPTQ and AWQ: the Marlin kernels' shape rules for one layer as a rank holds it (fused parts summed
    into one N; every part packs whole int32 words along N where the format packs along N)."""
    n, min_n = sum(out_parts), MARLIN_MOE_MIN_N if moe else MARLIN_MIN_N
    if n % min_n:
        kernel = "the Marlin MoE kernel's" if moe else "Marlin's"
        return f"output size {n} is not a multiple of {min_n} ({kernel} minimum tile)"
    if in_part % min_k:
        return f"input size {in_part} is not a multiple of {min_k} (Marlin's minimum tile)"
    if not moe and n % MARLIN_WIDE_TILE and in_part % MARLIN_WIDE_TILE:
        # gptq_marlin.cuh's thread configs (thread_k, thread_n) are (128, 128), (64, 128), (128, 64) and (64, 256):
        # no tile fits when neither N nor K is a multiple of 128. Found on the GPU: SmolLM2's GPTQ qkv (N 960, K 576)
        # loads, then its first forward fails "Invalid thread config" (docs/gpu-results.md §10)
        return (f"output size {n} and input size {in_part}: Marlin has a thread tile for neither (one of them must "
                f"be a multiple of {MARLIN_WIDE_TILE})")
    if 0 < group_size < in_full and in_part % group_size:
        return f"input size {in_part} splits a quantization group of {group_size}"
    pf = 32 // bits
    if any(o % pf for o in out_parts):
        return f"a fused part's output size ({out_parts}) is not a multiple of {pf} packed values"
    return None


def v1_to_v2_words(qzeros, bits: int):
    """gptqmodel's reading of v1 zero points: add 1 to every packed field as one integer addition per word (int32
    wrap-around), exactly undoing the subtraction its v1 writer did. torch or numpy in, the same kind out."""
    one_each = sum(1 << (bits * k) for k in range(32 // bits))
    if isinstance(qzeros, np.ndarray):
        return ((qzeros.astype(np.int64) + one_each) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    import torch

    wide = qzeros.to(torch.int64) + one_each
    return torch.where(wide >= 2**31, wide - 2**32, wide).to(torch.int32)


def _identity_groups(g_idx, group_size: int) -> bool:
    """g_idx [..., in] (any leading axes: modules stacked) is the plain group order: input i in group i // size."""
    return bool((g_idx == (np.arange(g_idx.shape[-1]) // group_size if group_size > 0 else 0)).all())


def group_size_ok(v: int) -> int:
    if v != -1 and v <= 0:
        raise ValueError(f"group_size {v} must be -1 (one group) or positive")
    return v


class GPTQParams(Params):
    bits: Literal[4, 8]
    group_size: int
    desc_act: bool
    sym: Literal[True]  # Marlin is symmetric only: asymmetric GPTQ is written as wna16 (repack), so never recorded
    checkpoint_format: Literal["gptq", "gptq_v2"]
    converted_from: Optional[Literal["gptq_v2"]] = None

    _group = field_validator("group_size")(group_size_ok)


class GPTQConfig(ProducerConfig):
    """gptqmodel / auto-gptq quantize_config (config.json quantization_config or quantize_config.json)."""
    bits: int = 4
    group_size: int = 128
    checkpoint_format: Optional[str] = None
    format: Optional[str] = None
    sym: bool = True
    desc_act: bool = False
    dynamic: Optional[dict] = None

    _group = field_validator("group_size")(group_size_ok)


class GPTQ(Format):
    name = kind = "gptq"
    quant_methods = ("gptq",)
    params_model = GPTQParams
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    value_tensors = ("scales", "qzeros", "g_idx")
    sglang_moe_runner = "marlin"
    # GPTQ-Marlin MoE creates fp16 scales and its kernel asserts activations of the scales' dtype (0.5.17
    # fused_marlin_moe.py): in a bf16 model it loads, then fails at the first forward
    moe_model_dtypes = ("float16",)
    rtn_factor, module_floor, block_error_band, logits_cosine_band = 3.0, 0.02, 0.40, 0.85

    def scheme_of(self, module, tensors, config, where):
        return config if {"qweight", "g_idx"} <= set(tensors) else None

    def read_config(self, qc: dict, where: str) -> Scheme:
        """The one scheme every quantized module of the checkpoint has (built once, not per module)."""
        c = parse_config(GPTQConfig, qc, where)
        bits, gs, sym, desc_act = c.bits, c.group_size, c.sym, c.desc_act
        fmt = c.checkpoint_format or c.format or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise UserError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (only gptq and gptq_v2); "
                            f"re-export it with format='gptq'")
        if bits not in (4, 8):
            raise UserError(f"{where}: GPTQ with {bits} bits has no native SGLang Marlin kernel (4 or 8 only)")
        if c.dynamic:
            raise UserError(f"{where}: GPTQ `dynamic` per-module overrides are not supported yet; use a uniform "
                            f"GPTQ checkpoint")
        return Scheme.of("gptq", bits=bits, group_size=gs, desc_act=desc_act, sym=sym, checkpoint_format=fmt)

    def describe(self, p):
        return (f"gptq int{p['bits']} g{p['group_size']}{' desc_act' if p['desc_act'] else ''}"
                f"{'' if p['sym'] else ' asym'}"
                f"{' (v2→v1)' if p.get('converted_from') else ''}")

    def expected(self, p, out_f, in_f):
        pf, gs = 32 // p["bits"], p["group_size"]
        groups = ceil_div(in_f, gs) if gs > 0 else 1
        return {"qweight": Expect(("I32",), (in_f // pf, out_f)), "qzeros": Expect(("I32",), (groups, out_f // pf)),
                "scales": Expect(("F16", "BF16"), (groups, out_f)), "g_idx": Expect(("I32",), (in_f,))}

    def zeros(self, qzeros, p):
        """The zero points [groups, out] (torch or numpy, as given)."""
        if p["checkpoint_format"] == "gptq":
            qzeros = v1_to_v2_words(qzeros, p["bits"])
        return unpack_cols(qzeros, p["bits"])

    def dequantize(self, t, p, out_f, in_f):
        q = unpack_rows(t["qweight"], p["bits"])  # [in, out]
        g = t["g_idx"].long()
        z = self.zeros(t["qzeros"], p)[g]  # [in, out]
        s = t["scales"].float()[g]
        return ((q - z).float() * s).T.contiguous()

    def round_to_nearest(self, w, p):
        return round_to_nearest_int(w, p["bits"], p["group_size"], symmetric=True)

    def serve_problem(self, module, t, p, layout=MP_LAYOUT):
        if self.repack(p, layout) and not _identity_groups(np.asarray(t["g_idx"]), p["group_size"]):
            if layout == CT_LAYOUT:
                return (f"{module} has a desc_act permutation (g_idx), which compressed-tensors can no longer "
                        f"express (>= 0.19 dropped actorder 'group'); build it without --to compressed-tensors "
                        f"(GPTQ-Marlin serves it through the shim) or re-quantize with desc_act=False")
            return (f"{module} is asymmetric GPTQ with a desc_act permutation (g_idx): SGLang 0.5.17 has no kernel "
                    f"for zero points with a g_idx (compressed-tensors >= 0.19 dropped actorder 'group'); "
                    f"re-quantize with desc_act=False or sym=True")
        return None

    def serve_problems(self, names, stacked, p, layout):
        # only a module written repacked can fail to serve (serve_problem): GPTQ-Marlin takes any g_idx
        return super().serve_problems(names, stacked, p, layout) if self.repack(p, layout) else []

    def repack(self, p, layout=MP_LAYOUT):
        """Asymmetric GPTQ (no Marlin kernel) always, symmetric for a compressed-tensors export: → WNA16."""
        if p["sym"] and layout != CT_LAYOUT:
            return None
        return repacked_scheme(p["bits"], p["group_size"], p["sym"], p["checkpoint_format"])

    repack_from = REPACK_FROM

    def repack_tensors(self, t, p, out_f, in_f):
        """GPTQ → compressed-tensors WNA16: both pack along the input lowest-first as unsigned values, so
        weight_packed is qweight's word matrix transposed; the scales transposed; asymmetric: the zero points (v1
        first made v2, as gptqmodel reads them) transposed likewise (symmetric: implied, check_values proved them)."""
        import torch

        out = {"weight_packed": t["qweight"].T.contiguous(), "weight_scale": t["scales"].T.contiguous(),
               "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
        if not p["sym"]:
            zeros = v1_to_v2_words(t["qzeros"], p["bits"]) if p["checkpoint_format"] == "gptq" else t["qzeros"]
            out["weight_zero_point"] = zeros.T.contiguous()
        return out

    def check_values(self, module, t, p):
        """Also on modules stacked on a leading axis (all_values_ok): every condition holds for all of them."""
        problem = positive_scales(module, "scales", t["scales"])
        if problem:
            return problem
        groups = t["scales"].shape[-2]
        g = np.asarray(t["g_idx"])
        if g.size and (int(g.min()) < 0 or int(g.max()) >= groups):
            return f"{module}.g_idx has values outside [0, {groups})"
        if not p["desc_act"] and not _identity_groups(g, p["group_size"]):
            return f"{module}.g_idx is permuted but desc_act is false"
        if p["sym"]:  # Marlin (and a WNA16 repack) imply the midpoint: the stored zeros must say the same
            mid = 1 << (p["bits"] - 1)
            q = np.asarray(t["qzeros"])
            if not (self.zeros(q.reshape(-1, q.shape[-1]), p) == mid).all():
                stored = f"zero−1 = {mid - 1}" if p["checkpoint_format"] == "gptq" else f"the zero {mid}"
                return (f"{module}.qzeros: a symmetric {p['checkpoint_format']} checkpoint stores {stored} "
                        f"everywhere, found other values (v1/v2 mislabelled?)")
        return None

    def all_values_ok(self, stacked, p):
        return self.check_values("", stacked, p) is None

    def rewrite(self, suffix, p):
        if suffix != "qzeros" or p["checkpoint_format"] != "gptq_v2":
            return None
        bits = p["bits"]

        def v2_to_v1(qzeros):
            z = unpack_cols(qzeros, bits)
            if bool((z == 0).any()):
                raise UserError("gptq_v2 zero point 0 cannot be stored as v1 (zero−1 < 0); re-export as v1")
            return pack_cols(z - 1, bits)

        return "gptq_v2_to_v1_qzeros", v2_to_v1

    def output_params(self, p, model_type, layout=MP_LAYOUT):
        if p["checkpoint_format"] == "gptq_v2":
            return {**p, "checkpoint_format": "gptq", "converted_from": "gptq_v2"}
        return p

    def kernel_problem(self, p, out_parts, in_part, in_full, split_out, split_in, moe):
        return marlin_problem(p["bits"], p["group_size"], out_parts, in_part, in_full, MARLIN_KERNEL_MIN_K, moe)

    def sglang_config(self, p):
        return "gptq_marlin", {"quant_method": "gptq", "bits": p["bits"], "group_size": p["group_size"],
                               "desc_act": p["desc_act"], "sym": p["sym"], "lm_head": False}

    def sglang_methods(self, p, moe):
        return ("GPTQMarlinMoEMethod", "GPTQMarlinMoEScheme") if moe else ("GPTQMarlinLinearMethod", None)


GPTQ_FORMAT = register(GPTQ())
