"""Benchmark `mpconvert build` against `cp -r` of the same output bytes, and peak RSS as the model doubles.

Synthetic sources (a benchmark, not a test): a Llama-shaped bf16 base plus GPTQ-int4 and compressed-tensors FP8
checkpoints whose tensors have the exact layouts (random bytes of the right dtypes/shapes; values don't matter for
copy speed). Prints one table; everything is measured in this one run, on this machine.

    python bench/build_bench.py [--hidden 4096] [--inter 11008] [--layers 6] [--workdir /tmp/mpc-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import timed  # noqa: E402  (one timer for every benchmark)

VOCAB = 32000


def llama_config(h, inter, layers, qc=None):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": h // 128, "num_key_value_heads": h // 128,
           "head_dim": 128, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    if qc:
        cfg["quantization_config"] = qc
    return cfg


def linears(h, inter):
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}


def module_tensors(kind, o, i, g):
    if kind == "base":
        return {"weight": torch.randn(o, i, generator=g, dtype=torch.float32).to(torch.bfloat16)}
    if kind == "fp8":
        # finite FP8 values (random int8 bits would include 0xFF and 0x7F, e4m3's NaNs, which verify rightly refuses)
        return {"weight": torch.randn(o, i, generator=g).to(torch.float8_e4m3fn),
                "weight_scale": torch.ones(o, 1, dtype=torch.bfloat16)}
    groups = i // 128
    return {"qweight": torch.randint(-2**31, 2**31 - 1, (i // 8, o), generator=g, dtype=torch.int32),
            "qzeros": torch.full((groups, o // 8), 0x77777777, dtype=torch.int32),
            "scales": ((torch.rand(groups, o, generator=g) + 0.5) * 0.01).to(torch.float16),  # > 0, as GPTQ writes
            "g_idx": (torch.arange(i, dtype=torch.int32) // 128)}


QC = {"fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
              "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "format": "float-quantized",
              "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
              "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}},
      "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
               "checkpoint_format": "gptq"}}


# attention in FP8, lm_head bf16, the rest GPTQ; paths relative to the recipe, beside the three sources
RECIPE = ("base: ./base\nsources: {fp8: ./fp8, gptq: ./gptq}\ndefault: gptq\nrules:\n"
          "  - {match: 'self_attn.*', source: fp8}\n  - {match: lm_head, source: base}\n")


def make_source(root: Path, kind: str, h, inter, layers):
    """One shard per layer, so the generator's memory stays at one layer."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for L in range(layers + 1):
        sd = {}
        if L == layers:  # embeddings, final norm, head: bf16 and identical in every source (as real ones are)
            g = torch.Generator().manual_seed(1)
            sd["model.embed_tokens.weight"] = torch.randn(VOCAB, h, generator=g).to(torch.bfloat16)
            sd["lm_head.weight"] = torch.randn(VOCAB, h, generator=g).to(torch.bfloat16)
            sd["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        else:
            for n, (o, i) in linears(h, inter).items():
                for s, t in module_tensors(kind, o, i, g).items():
                    sd[f"model.layers.{L}.{n}.{s}"] = t
            for n in ("input_layernorm", "post_attention_layernorm"):
                sd[f"model.layers.{L}.{n}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        fname = f"model-{L:05d}.safetensors"
        save_file(sd, root / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in sd})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(llama_config(h, inter, layers, QC.get(kind))))


def run_size(work: Path, h, inter, layers) -> dict:
    d = work / f"L{layers}"
    shutil.rmtree(d, ignore_errors=True)
    for kind in ("base", "fp8", "gptq"):
        make_source(d / kind, kind, h, inter, layers)
    (d / "recipe.yaml").write_text(RECIPE)
    exe = str(Path(sys.executable).parent / "mpconvert")
    # warm the page cache for both contenders alike: read the sources once
    subprocess.run(["cat"] + [str(p) for p in d.rglob("*.safetensors")], stdout=subprocess.DEVNULL, check=True)
    build_s, rss = timed([exe, "build", str(d / "recipe.yaml"), "-o", str(d / "out"), "--json"])
    out_bytes = sum(p.stat().st_size for p in (d / "out").glob("*.safetensors"))
    largest = max(p.stat().st_size for p in (d / "base").glob("*.safetensors"))
    cp_s, _ = timed(["cp", "-r", str(d / "out"), str(d / "out-cp")])
    # build fsyncs every shard before the rename (durability); the like-for-like baseline syncs too
    cps_s, _ = timed(["sh", "-c", f"cp -r '{d / 'out'}' '{d / 'out-cps'}' && sync"])
    res = {"layers": layers, "output_GB": out_bytes / 1e9, "build_s": build_s, "cp_s": cp_s,
           "ratio": build_s / cp_s, "cp_sync_s": cps_s, "ratio_sync": build_s / cps_s, "peak_rss_GiB": rss / 2**30, "largest_tensor_GiB": VOCAB * h * 2 / 2**30,
           "largest_shard_GiB": largest / 2**30}
    # a comparable job for mergekit: passthrough of the bf16 base, against mpconvert doing the same (default: base)
    mk = Path(sys.executable).parents[2] / ".venv-bench" / "bin" / "mergekit-yaml"
    (d / "base.yaml").write_text("base: ./base\nsources: {}\ndefault: base\n")
    res["pass_GB"] = sum(p.stat().st_size for p in (d / "base").glob("*.safetensors")) / 1e9
    res["mpc_pass_s"], res["mpc_pass_rss_GiB"] = timed([exe, "build", str(d / "base.yaml"), "-o", str(d / "pb")])
    res["mpc_pass_rss_GiB"] /= 2**30
    if mk.exists():
        (d / "mk.yaml").write_text(f"slices:\n  - sources:\n      - model: {d / 'base'}\n"
                                   f"        layer_range: [0, {layers}]\nmerge_method: passthrough\ndtype: bfloat16\n")
        res["mergekit_s"], rss_mk = timed([str(mk), str(d / "mk.yaml"), str(d / "mk"), "--lazy-unpickle",
                                           "--no-copy-tokenizer"])
        res["mergekit_rss_GiB"] = rss_mk / 2**30
    shutil.rmtree(d)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/mpc-bench")
    a = ap.parse_args()
    work = Path(a.workdir)
    rows = [run_size(work, a.hidden, a.inter, a.layers), run_size(work, a.hidden, a.inter, 2 * a.layers)]
    print(f"{'layers':>6} {'output GB':>9} {'build s':>8} {'cp -r s':>8} {'build/cp':>8} {'peak RSS GiB':>12} "
          f"{'largest tensor GiB':>18} {'cp+sync s':>9} {'build/(cp+sync)':>15} | {'passthrough GB':>14} {'mpconvert s':>11} {'mergekit s':>10} "
          f"{'mergekit RSS GiB':>16}")
    for r in rows:
        print(f"{r['layers']:>6} {r['output_GB']:>9.2f} {r['build_s']:>8.2f} {r['cp_s']:>8.2f} {r['ratio']:>8.2f} "
              f"{r['peak_rss_GiB']:>12.2f} {r['largest_tensor_GiB']:>18.2f} {r['cp_sync_s']:>9.2f} {r['ratio_sync']:>15.2f} | {r['pass_GB']:>14.2f} "
              f"{r['mpc_pass_s']:>11.2f} {r.get('mergekit_s', float('nan')):>10.2f} "
              f"{r.get('mergekit_rss_GiB', float('nan')):>16.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
