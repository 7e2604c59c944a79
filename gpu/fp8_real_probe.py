"""SGLang's FP8 W8A8 linear against mpconvert's CPU emulation of it, on SmolLM2's real activations and real
FP8-dynamic weights (llm-compressor's), layer by layer — gpu/fp8_accum_probe.py found the kernel exact on synthetic
inputs, yet the all-FP8 SmolLM2 serves 0.93% worse than its CPU reference.

Here (CPU):  .venv/bin/python gpu/fp8_real_probe.py capture .gpu-fp8probe/data.safetensors
             (the all-FP8 recipe run as plan's evaluation runs it; the input of every fused linear of LAYERS recorded
             before its activation quantization, as bf16, and those layers' FP8 weights and scales)
There (GPU): python3 gpu/fp8_real_probe.py compare .gpu-fp8probe/data.safetensors OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (0, 14, 29)
TOKENS = 128
FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def capture(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    import plan_bench as pb
    from mpconvert import choose, sensitivity
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe

    saved = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src = pb.sources_file(d)
        recipe = load_recipe(src, sources_only=True)
        c = choose.candidates(Inputs.open(recipe))
        r = load_recipe(pb.assignment_recipe(d, "all-fp8", src, c, {u: "fp8" for u in c.units}))
        model = sensitivity.base_model(recipe.path_of("base"), "cpu")
        hooks = []
        for layer in LAYERS:
            for unit, members in FUSED.items():
                mod = model.get_submodule(f"model.layers.{layer}.{members[0]}")

                def grab(m, args, key=f"{layer}.{unit}.x"):
                    saved[key] = args[0][0, :TOKENS].to(torch.bfloat16).contiguous()

                hooks.append(mod.register_forward_pre_hook(grab, prepend=True))
        ids = sensitivity.calibration_ids(recipe.tokenizer_dirs(), pb.EVAL, 1024)[:1]
        # evaluate runs the base, then installs the FP8 weights and activation hooks and runs again: the grab hooks
        # run before the activation quantization, and the second run's inputs are the ones kept
        sensitivity.evaluate(r, None, 0, "cpu", model, ids=ids)
        for h in hooks:
            h.remove()
        fp8 = Path(recipe.path_of("fp8"))
        tensors = {}
        for f in sorted(fp8.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    tensors[k] = f
        for layer in LAYERS:
            for unit, members in FUSED.items():
                names = [f"model.layers.{layer}.{m}" for m in members]
                with safe_open(tensors[names[0] + ".weight"], "pt") as h:
                    saved[f"{layer}.{unit}.w"] = torch.cat([h.get_tensor(n + ".weight") for n in names])
                    saved[f"{layer}.{unit}.s"] = torch.cat([h.get_tensor(n + ".weight_scale") for n in names]).float()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(saved, str(out))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {len(saved)} tensors")


def rel(a, b, ref):
    return float((a.double() - b.double()).norm() / ref.double().norm())


def compare(data: Path, out: Path) -> None:
    from safetensors.torch import load_file

    import sglang.srt.layers.quantization.fp8_utils as fu
    sys.path.insert(0, str(ROOT))
    from converter.formats.fp8 import FP8

    t = {k: v.cuda() for k, v in load_file(str(data)).items()}
    rows = []
    for layer in LAYERS:
        for unit in FUSED:
            x, qw, sw = t[f"{layer}.{unit}.x"], t[f"{layer}.{unit}.w"], t[f"{layer}.{unit}.s"]
            kernel = fu.apply_fp8_linear(input=x, weight=qw.t(), weight_scale=sw, input_scale=None, bias=None,
                                         use_per_token_if_dynamic=True, compressed_tensor_quant=True)
            w = qw.float() * sw
            xq = FP8().quantize_activations(x.float(), {"activation": "dynamic", "strategy": "channel"}, {})
            emul = xq @ w.T
            weight_only = x.float() @ w.T
            qx, sx = fu.scaled_fp8_quant(x, None, use_per_token_if_dynamic=True)
            per_token = ((kernel.float() - emul).norm(dim=1) / emul.norm(dim=1)).cpu()
            rows.append({
                "layer": layer, "unit": unit, "x_absmax": float(x.abs().max()),
                "x_token_absmax_max_over_median": float(x.abs().amax(1).max() / x.abs().amax(1).median()),
                "kernel_vs_emulation": rel(kernel, emul, emul), "bf16_floor": rel(emul.to(torch.bfloat16), emul, emul),
                "emulation_vs_weight_only": rel(emul, weight_only, weight_only),
                "activation_quant_same_fraction": float(((qx.float() * sx) == xq).float().mean()),
                "worst_tokens": [(int(i), round(float(per_token[i]), 5)) for i in per_token.argsort()[-3:]],
            })
            print(json.dumps(rows[-1]), flush=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture(Path(sys.argv[2]))
    else:
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
