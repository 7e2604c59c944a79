"""What SGLang 0.5.17's FP8 W8A8 linear (compressed-tensors, per-channel weights, dynamic per-token activations)
computes on this GPU, against the exact product of the same FP8 operands — the question behind the all-FP8 SmolLM2
serving 0.93% worse than its CPU reference (docs/gpu-results.md §10) while all-Int8 matches to noise.

Runs SGLang's own apply_fp8_linear as CompressedTensorsW8A8Fp8.apply_weights calls it, on SmolLM2's GEMM shapes,
and reports per shape: the kernel's error against the exact product (float64) of its own quantized operands, the
bf16-output floor, the bias, torch._scaled_mm with and without fast accumulation, whether mpconvert's activation
emulation quantizes as SGLang does, and which limited-precision accumulation model (chunk of C products, sum
truncated to m mantissa bits) reproduces the kernel best.

    PYTHONPATH=/tmp/site:. python3 gpu/fp8_accum_probe.py OUT.json   (after gpu/plan_serve.sh setup)
"""
import json
import sys

import torch

import sglang.srt.layers.quantization.fp8_utils as fu
from converter.formats.fp8 import FP8

FMAX = torch.finfo(torch.float8_e4m3fn).max
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (4096, 4096)]  # (K, N): SmolLM2's qkv, o, gate_up, down
M = 256


def activations(k, gen):
    """Per-channel magnitudes spread over two orders plus a few outlier channels, as real residual streams have."""
    ch = torch.exp(torch.randn(k, generator=gen))
    ch[:3] *= 20
    return (torch.randn(M, k, generator=gen) * ch).to(torch.bfloat16).cuda()


def truncate(v, m):
    """Round toward zero to m mantissa bits (float64 in, float64 out)."""
    e = torch.floor(torch.log2(v.abs().clamp(min=1e-300)))
    q = torch.exp2(e - m)
    return torch.sign(v) * torch.floor(v.abs() / q) * q


def accumulate(px, pw, chunk, m):
    """Products of FP8 values summed exactly within chunks of `chunk` inputs, the running sum truncated to m bits."""
    acc = torch.zeros(px.shape[0], pw.shape[0], dtype=torch.float64, device=px.device)
    for c in range(0, px.shape[1], chunk):
        acc = truncate(acc + px[:, c:c + chunk] @ pw[:, c:c + chunk].T, m)
    return acc


def rel(a, b, ref):
    return float((a.double() - b.double()).norm() / ref.double().norm())


def probe(k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = activations(k, gen)
    w = (torch.randn(n, k, generator=gen) * 0.02).cuda()
    sw = (w.abs().amax(1, keepdim=True) / FMAX).float()
    qw = (w / sw).clamp(-FMAX, FMAX).to(torch.float8_e4m3fn)
    out = fu.apply_fp8_linear(input=x, weight=qw.t(), weight_scale=sw, input_scale=None, bias=None,
                              use_per_token_if_dynamic=True, compressed_tensor_quant=True)
    qx, sx = fu.scaled_fp8_quant(x, None, use_per_token_if_dynamic=True)
    px, pw = qx.double(), qw.double()
    exact = (px @ pw.T) * sx.double() * sw.double().T
    floor = rel(exact.to(torch.bfloat16), exact, exact)
    mine = FP8().quantize_activations(x.float(), {"activation": "dynamic", "strategy": "channel"}, {})
    theirs = qx.float() * sx
    row = {
        "K": k, "N": n, "seed": seed,
        "kernel_vs_exact": rel(out, exact, exact), "bf16_floor": floor,
        "kernel_bias": float(((out.double() - exact) * exact.sign()).mean() / exact.abs().mean()),
        "activation_quant_same_fraction": float((mine == theirs).float().mean()),
        "activation_quant_max_diff": float((mine - theirs).abs().max()),
    }
    for fast in (False, True):
        y = torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw.T.contiguous(), out_dtype=torch.float32,
                             use_fast_accum=fast)
        row[f"torch_scaled_mm_fast{int(fast)}_vs_exact"] = rel(y, exact, exact)
    models = {}
    for chunk in (4, 8, 16, 32, 64, 128):
        for m in (10, 11, 12, 13, 14, 15, 16, 18, 20, 23):
            y = accumulate(px, pw, chunk, m) * sx.double() * sw.double().T
            models[f"C{chunk}_m{m}"] = rel(out, y.to(torch.bfloat16), exact)
    best = sorted(models.items(), key=lambda kv: kv[1])[:5]
    row["best_models_kernel_residual"] = best
    row["fp32_model_kernel_residual"] = rel(out, exact.to(torch.bfloat16), exact)
    return row


def main():
    print("device", torch.cuda.get_device_name(), "cutlass_fp8_supported", fu.cutlass_fp8_supported())
    rows = [probe(k, n, s) for k, n in SHAPES for s in (0, 1)]
    for r in rows:
        print(json.dumps(r))
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
