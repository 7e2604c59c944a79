"""Where the all-FP8 SmolLM2's 0.93% (GPU served vs CPU reference) comes from, at the level of the whole model —
gpu/fp8_real_probe.py found SGLang's FP8 linear equal to mpconvert's emulation on real activations, to bf16 rounding.

Runs one FP8-dynamic checkpoint (llm-compressor's, as the fixtures make it) five ways on the held-out windows:
SGLang serving it; transformers in bf16 with every linear replaced by SGLang's own FP8 kernel (apply_fp8_linear, as
CompressedTensorsW8A8Fp8 calls it); the same with mpconvert's emulation in place of the kernel; the emulation in
float32 (what plan's CPU reference computes); and weight-only dequantized FP8 in bf16 (no activation quantization).

Here (CPU):  .venv/bin/python gpu/fp8_model_probe.py stage         # → .gpu-fp8m/part.NN (the checkpoint + windows)
There (GPU): bash gpu/plan_serve.sh setup; bash gpu/plan_serve.sh part .gpu-fp8m (each part); then
             bash gpu/plan_serve.sh fp8probe                        # → $OUT/fp8_model_probe.json
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
DEVICE = "cuda"


def stage() -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "gpu"))
    sys.path.insert(0, str(ROOT / "bench"))
    import plan_bench as pb
    import tempfile

    from plan_serve import EVAL_TOKENS, staging

    from fixtures.factory import smollm2
    from mpconvert import choose, sensitivity
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe

    with staging("fp8m", ".gpu-fp8m") as tmp, tempfile.TemporaryDirectory() as work:
        d = tmp / "fp8m"
        d.mkdir()
        subprocess.run(["cp", "-rL", str(smollm2("fp8-dynamic")), str(d / "fp8")], check=True)
        ids = sensitivity.calibration_ids([smollm2("base")], pb.EVAL, EVAL_TOKENS)
        (d / "windows.json").write_text(json.dumps(ids.tolist()))
        src = pb.sources_file(Path(work))
        c = choose.candidates(Inputs.open(load_recipe(src, sources_only=True)))
        recipe = pb.assignment_recipe(Path(work), "all-fp8", src, c, {u: "fp8" for u in c.units})
        cpu = sensitivity.evaluate(load_recipe(recipe), None, 0, "cpu", ids=ids)
        (d / "cpu.json").write_text(json.dumps(cpu))
        print("cpu", cpu)


def perplexity(model, windows, device=None) -> float:
    import torch

    nll, n, device = 0.0, 0, device or DEVICE
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w], device=device)
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
            nll -= float(logp[0, :-1].gather(-1, ids[0, 1:, None]).double().sum())
            n += len(w) - 1
    return round(math.exp(nll / n), 4)


def hybrid(d: Path, dtype, mode: str, kernel_in=lambda layer, name: True, stats=None):
    """transformers' Llama from the checkpoint's config, its norms and embeddings from the checkpoint, every linear
    computing from the FP8 weight and scale: 'kernel' SGLang's apply_fp8_linear, 'emulation' mpconvert's per-token
    FP8 activation quantization and a float32 product, 'weight-only' the dequantized weight alone."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from converter.formats.fp8 import FP8

    if mode.startswith("kernel"):
        import sglang.srt.layers.quantization.fp8_utils as fu

    cfg = AutoConfig.from_pretrained(d)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).to(DEVICE).eval()
    sd = {k: v.to(DEVICE) for k, v in load_file(str(d / "model.safetensors")).items()}
    emulate = FP8().quantize_activations

    def emulated(x2, w):
        return emulate(x2.float(), {"activation": "dynamic", "strategy": "channel"}, {}) @ w.T

    class FP8Linear(torch.nn.Module):
        def __init__(self, qw, sw, where):
            super().__init__()
            self.qw, self.sw, self.where = qw, sw.float(), where
            self.w = qw.float() * self.sw

        def forward(self, x):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if mode.startswith("kernel") and kernel_in(*self.where):
                if mode == "kernel":
                    y = fu.apply_fp8_linear(input=x2.to(torch.bfloat16), weight=self.qw.t(), weight_scale=self.sw,
                                            input_scale=None, bias=None, use_per_token_if_dynamic=True,
                                            compressed_tensor_quant=True)
                else:  # torch's own FP8 GEMM, with or without fast accumulation, float32 out
                    qx, sx = fu.scaled_fp8_quant(x2.to(torch.bfloat16), None, use_per_token_if_dynamic=True)
                    y = torch._scaled_mm(qx, self.qw.t(), scale_a=sx, scale_b=self.sw.T.contiguous(),
                                         out_dtype=torch.float32, use_fast_accum=mode == "kernel-torch-fast")
                if stats is not None:
                    e = emulated(x2, self.w)
                    r = ((y.float() - e).norm(dim=1) / e.norm(dim=1).clamp(min=1e-30))
                    stats.append((float(r.max()), int(r.argmax()), float(r.mean()), *self.where))
            elif mode.startswith("kernel") or mode == "emulation":
                y = emulated(x2, self.w)
            else:
                y = x2.float() @ self.w.T
            return y.to(x.dtype).reshape(*shape[:-1], -1)

    plain = {k: v for k, v in sd.items() if not any(f".{n}." in k for n in LINEARS)}
    missing, _ = model.load_state_dict(plain, strict=False)
    for i, layer in enumerate(model.model.layers):
        for n in LINEARS:
            p = f"model.layers.{i}.{n}"
            parent, attr = n.split(".")
            setattr(getattr(layer, parent), attr, FP8Linear(sd[p + ".weight"], sd[p + ".weight_scale"], (i, n)))
    left = [k for k in missing if not any(f".{n}." in k for n in LINEARS) and k != "lm_head.weight"]
    assert not left, left
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def run(d: Path, out: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "gpu"))
    from plan_serve import _outputs, _perplexity

    windows = json.loads((d / "windows.json").read_text())
    res = {"cpu reference (float32, emulation)": json.loads((d / "cpu.json").read_text())["perplexity"],
           "tokens": sum(len(w) - 1 for w in windows)}
    print("tf32", torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    res["sglang served"] = _perplexity(_outputs(d / "fp8", windows)["lps"])
    print(res, flush=True)
    stats = []
    m = hybrid(d / "fp8", torch.bfloat16, "kernel", stats=stats)
    res["bf16 + kernel (per-call stats)"] = perplexity(m, windows)
    stats.sort(reverse=True)
    res["worst calls (max token rel diff, token, mean rel diff, layer, linear)"] = stats[:12]
    res["median call mean rel diff"] = sorted(s[2] for s in stats)[len(stats) // 2]
    del m
    bisect = {"attention": lambda i, n: n.startswith("self_attn"), "mlp": lambda i, n: n.startswith("mlp"),
              "down": lambda i, n: n == "mlp.down_proj", "gate_up": lambda i, n: n in ("mlp.gate_proj", "mlp.up_proj"),
              "layers 0-9": lambda i, n: i < 10, "layers 10-19": lambda i, n: 10 <= i < 20,
              "layers 20-29": lambda i, n: i >= 20, "layer 0": lambda i, n: i == 0, "layer 29": lambda i, n: i == 29}
    for name, where in bisect.items() if "--bisect" in sys.argv else ():
        res[f"bf16 + kernel only in {name}"] = perplexity(hybrid(d / "fp8", torch.bfloat16, "kernel", where), windows)
        print(name, res[f"bf16 + kernel only in {name}"], flush=True)
    for mode in ("kernel-torch-precise", "kernel-torch-fast"):
        res[f"bf16 + {mode}"] = perplexity(hybrid(d / "fp8", torch.bfloat16, mode), windows)
        print(mode, res[f"bf16 + {mode}"], flush=True)
    for dtype, mode in ((torch.bfloat16, "kernel"), (torch.bfloat16, "emulation"), (torch.float32, "emulation"),
                        (torch.bfloat16, "weight-only"), (torch.float32, "weight-only")):
        m = hybrid(d / "fp8", dtype, mode)
        res[f"transformers {str(dtype)[6:]} + {mode}"] = perplexity(m, windows)
        print(res, flush=True)
        del m
        torch.cuda.empty_cache()
    print("RESULT " + json.dumps(res))
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "stage":
        stage()
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
