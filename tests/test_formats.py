"""Each format module alone, on synthetic tensors (seconds, the main venv only): packing, the reference dequantizer
against the format's own formula, expected shapes, value invariants, params schema, round-to-nearest, rewrites."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpconvert.formats import FORMATS, READERS
from mpconvert.formats.awq import AWQ_ORDER
from mpconvert.formats.intpack import pack_cols, round_to_nearest_int, unpack_cols, unpack_rows

g = torch.Generator().manual_seed(0)
GPTQ = {"bits": 4, "group_size": 32, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
AWQ = {"bits": 4, "group_size": 32, "zero_point": True}
FP8 = {"layout": "ct", "strategy": "block", "block": [32, 32], "activation": "dynamic"}
INT8 = {"layout": "ct", "activation": "dynamic"}


def pack_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """[R*pf, C] small ints → [R, C] int32, field i of word r = row r*pf+i (GPTQ's qweight)."""
    pf = 32 // bits
    v = vals.to(torch.int64).reshape(-1, pf, vals.shape[1])
    word = sum(v[:, i] << (bits * i) for i in range(pf))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def test_unpack_inverts_packing():
    q = torch.randint(0, 16, (64, 24), generator=g)
    assert torch.equal(unpack_rows(pack_rows(q, 4), 4), q)
    assert torch.equal(unpack_cols(pack_cols(q, 4), 4), q)
    q8 = torch.randint(0, 256, (16, 8), generator=g)
    assert torch.equal(unpack_rows(pack_rows(q8, 8), 8), q8)


def test_awq_interleave():
    """Nibble k of word c is column 8c + AWQ_ORDER[k]."""
    q = torch.randint(0, 16, (4, 16), generator=g)
    fields = torch.stack([q[:, AWQ_ORDER[k]::8] for k in range(8)], -1)  # field k of each word
    words = sum(fields[..., k].to(torch.int64) << (4 * k) for k in range(8))
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(unpack_cols(packed, 4, AWQ_ORDER), q)


def gptq_tensors(out_f=64, in_f=128, p=GPTQ):
    groups = in_f // p["group_size"]
    q = torch.randint(0, 16, (in_f, out_f), generator=g)
    z = torch.full((groups, out_f), 8)
    s = torch.rand(groups, out_f, generator=g).half() + 0.01
    t = {"qweight": pack_rows(q, 4), "qzeros": pack_cols(z - 1, 4), "scales": s,
         "g_idx": (torch.arange(in_f) // p["group_size"]).int()}
    return t, q, z, s


def test_gptq_dequantizes_by_its_formula_and_v2_rewrites_exactly():
    f = FORMATS["gptq"]
    t, q, z, s = gptq_tensors()
    w = f.dequantize(t, GPTQ, 64, 128)
    g_idx = t["g_idx"].long()
    assert torch.equal(w, ((q - z[g_idx]).float() * s.float()[g_idx]).T)
    name, rewrite = f.rewrite("qzeros", {**GPTQ, "checkpoint_format": "gptq_v2"})
    v2 = pack_cols(z, 4)  # v2 stores the zero itself
    v1 = rewrite(v2.numpy())  # build rewrites on numpy (no torch import for a copy)
    assert name == "gptq_v2_to_v1_qzeros" and v1.dtype == np.int32 and (v1 == t["qzeros"].numpy()).all()
    zr = torch.randint(1, 16, (4, 64), generator=g)  # every nibble, the sign bit's too
    assert (rewrite(pack_cols(zr, 4).numpy()) == pack_cols(zr - 1, 4).numpy()).all()
    assert (pack_cols(zr.numpy(), 4) == pack_cols(zr, 4).numpy()).all()  # numpy packs as torch does
    assert f.rewrite("qweight", GPTQ) is None
    exp = f.expected(GPTQ, 64, 128)
    assert all(exp[k].accepts("I32" if k != "scales" else "F16", v.shape) for k, v in t.items())


@pytest.mark.parametrize("change,problem", [
    (lambda t: t["scales"].__setitem__((0, 0), float("nan")), "NaN or infinite scales"),
    (lambda t: t["scales"].__setitem__((1, 2), -1.0), "zero or negative scales"),
    (lambda t: t["g_idx"].__setitem__(3, 9), "g_idx has values outside"),
    (lambda t: t["g_idx"].__setitem__(slice(0, 2), torch.tensor([1, 0], dtype=torch.int32)), "permuted"),
    (lambda t: t["qzeros"].__setitem__((0, 0), 0x66666666), "v1/v2 mislabelled"),
])
def test_gptq_value_invariants(change, problem):
    t, *_ = gptq_tensors()
    assert FORMATS["gptq"].check_values("m", t, GPTQ) is None
    change(t)
    assert problem in FORMATS["gptq"].check_values("m", t, GPTQ)


@pytest.mark.parametrize("bad", [None, 0, 5, 11])
@pytest.mark.parametrize("case", range(5))
def test_gptq_checks_many_modules_stacked_as_it_checks_one(case, bad):
    """check_values_many (experts in batches) finds exactly the modules check_values finds, with its message: none
    in a clean batch, the one broken module wherever it sits."""
    import numpy as np

    changes = [lambda t: t["scales"].__setitem__((0, 0), np.nan), lambda t: t["scales"].__setitem__((1, 2), -1.0),
               lambda t: t["g_idx"].__setitem__(3, 9), lambda t: t["g_idx"].__setitem__(slice(0, 2), [1, 0]),
               lambda t: t["qzeros"].__setitem__((0, 0), 0x66666666)]
    f, mods = FORMATS["gptq"], []
    for i in range(12):
        t, *_ = gptq_tensors()
        t = {k: t[k].numpy().copy() for k in f.value_suffixes(GPTQ)}
        if i == bad:
            changes[case](t)
        mods.append((f"m{i}", t))
    want = [(n, p) for n, t in mods if (p := f.check_values(n, t, GPTQ))]
    stacked = {s: np.stack([t[s] for _, t in mods]) for s in mods[0][1]}
    assert f.check_values_many([n for n, _ in mods], stacked, GPTQ) == want and len(want) == (bad is not None)


def test_fp8_block_dequantizes_per_block_and_checks_scales():
    f = FORMATS["fp8"]
    w8 = (torch.randn(64, 96, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.1
    t = {"weight": w8, "weight_scale": s}
    w = f.dequantize(t, FP8, 64, 96)
    assert torch.equal(w[:32, 32:64], w8[:32, 32:64].float() * s[0, 1]) and torch.equal(w[32:, 64:],
                                                                                       w8[32:, 64:].float() * s[1, 2])
    assert f.check_values("m", t, FP8) is None
    t["weight_scale"][0, 0] = 0
    assert "zero or negative" in f.check_values("m", t, FP8)
    assert f.value_suffixes({**FP8, "layout": "native"}) == ("weight_scale_inv",)
    assert f.value_suffixes({**FP8, "strategy": "tensor", "block": None, "activation": "static"}) == (
        "weight_scale", "input_scale")


def test_int8_and_awq_dequantize_by_their_formulas():
    w8 = torch.randint(-128, 128, (16, 32), generator=g, dtype=torch.int8)
    s = torch.rand(16, 1, generator=g) + 0.01
    assert torch.equal(FORMATS["int8"].dequantize({"weight": w8, "weight_scale": s}, INT8, 16, 32), w8.float() * s)
    q = torch.randint(0, 16, (64, 16), generator=g)
    z = torch.randint(0, 16, (2, 16), generator=g)
    sc = torch.rand(2, 16, generator=g) + 0.01

    def pack(x):
        fields = torch.stack([x[:, AWQ_ORDER[k]::8] for k in range(8)], -1).to(torch.int64)
        words = sum(fields[..., k] << (4 * k) for k in range(8))
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    w = FORMATS["awq"].dequantize({"qweight": pack(q), "qzeros": pack(z), "scales": sc}, AWQ, 16, 64)
    rows = torch.arange(64) // 32
    assert torch.allclose(w, ((q - z[rows]).float() * sc[rows]).T)


def test_round_to_nearest_is_the_schemes_own_yardstick():
    w = torch.randn(64, 128, generator=g)
    errs = {name: FORMATS[name].rtn_error(w, p) for name, p in
            (("gptq", {**GPTQ, "bits": 8}), ("int8", INT8), ("fp8", FP8), ("awq", AWQ), ("unquantized",
                                                                                          {"dtype": "BF16"}))}
    assert errs["unquantized"] == 0
    assert 0.003 < errs["int8"] < 0.02 and 0.01 < errs["fp8"] < 0.05 and 0.05 < errs["awq"] < 0.2
    assert errs["gptq"] < errs["awq"]  # 8 bits vs 4
    sym4 = round_to_nearest_int(w, 4, 32, True)
    assert len(torch.unique(torch.round(sym4[0, :32] / (sym4[0, :32].abs().max() / 7)))) <= 16


@pytest.mark.parametrize("fmt,params,field", [
    ("gptq", {**GPTQ, "sym": False}, "sym"), ("gptq", {**GPTQ, "bits": 3}, "bits"),
    ("gptq", {**GPTQ, "group_size": 0}, "group_size"), ("gptq", {**GPTQ, "extra": 1}, "extra"),
    ("gptq", {**GPTQ, "desc_act": 0}, "desc_act"), ("awq", {**AWQ, "bits": 8}, "bits"),
    ("fp8", {**FP8, "block": None}, "block"), ("fp8", {**FP8, "block": [0, 128]}, "block"),
    ("fp8", {**FP8, "strategy": "tensor"}, "block"), ("int8", {**INT8, "activation": "static"}, "activation"),
    ("unquantized", {"dtype": "I8"}, "dtype"),
])
def test_params_schema_refuses(fmt, params, field):
    with pytest.raises(ValueError, match=field):
        FORMATS[fmt].check_params(params)
    FORMATS[fmt].check_params({"gptq": GPTQ, "awq": AWQ, "fp8": FP8, "int8": INT8,
                               "unquantized": {"dtype": "BF16"}}[fmt])


def test_every_quant_method_has_one_reader():
    assert sorted(READERS) == ["awq", "compressed-tensors", "fp8", "gptq", "w8a8_int8"]
    for name, f in FORMATS.items():
        assert all(READERS[m] is f for m in f.quant_methods), name


def test_marlin_shapes_dense_and_moe():
    """Marlin's thread configs (SGLang's kernel sources): dense N % 64 and K % 64 and one of them % 128 for GPTQ, K %
    128 for AWQ (SGLang's own gate there); the MoE kernel N % 128. SmolLM2's qkv (960 × 576) has no dense tile: the
    GPU run found it (docs/gpu-results.md §10); its gate_up (3072 × 576) and down (576 × 1536) have."""
    gptq = FORMATS["gptq"]
    assert "thread tile for neither" in gptq.kernel_problem(GPTQ, [576, 192, 192], 576, 576, False, False, False)
    assert gptq.kernel_problem(GPTQ, [1536, 1536], 576, 576, False, False, False) is None
    assert gptq.kernel_problem(GPTQ, [576], 1536, 1536, False, False, False) is None
    assert "multiple of 64" in gptq.kernel_problem(GPTQ, [32], 576, 576, False, False, False)
    assert "multiple of 64 (Marlin's minimum tile)" in gptq.kernel_problem(GPTQ, [128], 96, 96, False, False, False)
    assert gptq.kernel_problem(GPTQ, [64, 64], 256, 256, True, False, True) is None
    assert "Marlin MoE kernel's minimum tile" in gptq.kernel_problem(GPTQ, [32, 32], 256, 256, True, False, True)
    assert "multiple of 128" in FORMATS["awq"].kernel_problem(AWQ, [128], 576, 576, False, False, False)
    g128 = {**GPTQ, "group_size": 128}
    assert "splits a quantization group of 128" in gptq.kernel_problem(g128, [128], 192, 384, False, True, False)


def test_activation_quantization_as_sglang_kernels_do():
    """What plan emulates of a W8A8 layer's input: Int8 per token (scale absmax/127), FP8 per token, per token and
    group of block_k inputs for block FP8, one static scale; weight-only formats leave the input alone."""
    x = torch.randn(4, 256, generator=g) * 3
    s = x.abs().amax(-1, keepdim=True) / 127
    q = FORMATS["int8"].quantize_activations(x, {"layout": "ct", "activation": "dynamic"}, {})
    assert torch.allclose(q / s, (q / s).round(), atol=1e-4)  # on each token's grid
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1)) and 0 < float((q - x).abs().max()) <= float(s.max()) / 2
    f = FORMATS["fp8"]
    dyn = {**FP8, "strategy": "channel", "block": None, "activation": "dynamic"}
    q = f.quantize_activations(x, dyn, {})
    assert 0 < float((q - x).norm() / x.norm()) < 0.05
    blk = {**FP8, "activation": "dynamic"}
    y = x.clone()
    y[:, :128] *= 1e5  # an outlier group: the block scheme's other group keeps its own scale
    qb, qc = f.quantize_activations(y, blk, {}), f.quantize_activations(y, dyn, {})
    tail = lambda q: float((q[:, 128:] - y[:, 128:]).norm() / y[:, 128:].norm())  # noqa: E731
    assert tail(qb) < 0.05 < tail(qc)
    static = {**dyn, "activation": "static"}
    qs = f.quantize_activations(x, static, {"input_scale": torch.tensor([0.5])})
    assert torch.equal(qs, (x / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.5)
    assert FORMATS["gptq"].quantize_activations(x, GPTQ, {}) is x
