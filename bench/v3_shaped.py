"""A DeepSeek-V3-shaped job for the scale benchmark: 61 layers (the first 3 dense), 256 routed + 1 shared expert per
MoE layer, MLA attention, the V3 router's e_score_correction_bias — at tiny hidden sizes so that the files stay
small while the tensor count is the real model's. Four sources in the real producers' layouts: a bf16 base, a
compressed-tensors FP8-block (128×128) and a compressed-tensors W8A8-Int8 checkpoint (every linear but the routers
and lm_head), and a GPTQ int4 g128 checkpoint. Values are random in the right dtypes (copy and check speed does not
depend on them); scales positive, zero points symmetric, g_idx in order, as verify requires.

--mtp adds the multi-token-prediction layer the real release holds after the others (model.layers.{layers}: a MoE
decoder layer, and enorm, hnorm, eh_proj, shared_head and an embed_tokens copy in bf16 in every source).

    python bench/v3_shaped.py OUT_DIR [--layers 61] [--mtp]    → OUT_DIR/{base,fp8,int8,gptq}, OUT_DIR/recipe.yaml
                                                                  and OUT_DIR/recipe-per-expert.yaml (976 rules at 60)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

H, I_DENSE, I_MOE, EXPERTS, HEADS = 128, 256, 128, 256, 16
Q_LORA, KV_LORA, NOPE, ROPE, V = 128, 128, 128, 64, 128  # per rank at TP=8: whole 128-blocks, as V3
VOCAB = 1024

CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
          "ignore": ["lm_head", "re:.*mlp.gate$"], "config_groups": {"group_0": {
              "targets": ["Linear"], "format": "float-quantized",
              "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128],
                          "symmetric": True, "dynamic": False},
              "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128,
                                    "dynamic": True}}}}
CT_INT8 = {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
           "ignore": ["lm_head", "re:.*mlp.gate$"], "config_groups": {"group_0": {
               "targets": ["Linear"], "format": "int-quantized",
               "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
               "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", "meta": {"quantizer": ["gptqmodel:7.6.0"]}}

# The recipe (attention FP8, shared experts Int8, experts 0-15 FP8, the rest GPTQ), but kv_b_proj bf16: SGLang
# 0.5.17 absorbs an FP8 kv_b_proj in bfloat16 and runs GPTQ MoE in float16 only, so with both no dtype serves the
# model (rules.dtype_problems; found on an H100 in session 22 — build refuses that mix since)
RECIPE = """\
base: base
sources: {fp8: fp8, int8: int8, gptq: gptq}
default: gptq
rules:
  - {match: "self_attn.kv_b_proj", source: base}
  - {match: "self_attn.*", source: fp8}
  - {match: "mlp.shared_experts.*", source: int8}
  - {match: "mlp.experts.*", experts: "0-15", source: fp8}
  - {match: "lm_head", source: base}
  - {match: "mlp.*", moe: false, source: int8}
"""


def per_expert_recipe(layers: int) -> str:
    """The same sources with a rule per layer for attention and per layer and 16-expert range for the routed experts
    (FP8 and GPTQ alternating) — how a hand-written or generated per-expert recipe looks (976 rules at 60 layers;
    `mpconvert plan` writes one per layer and source for experts)."""
    lines = RECIPE.split("rules:")[0] + "rules:\n" + '  - {match: "self_attn.kv_b_proj", source: base}\n'
    lines += "".join(f'  - {{match: "self_attn.*", layers: {n}, source: {("int8", "fp8")[n % 2]}}}\n'
                     for n in range(layers))
    lines += "".join(f'  - {{match: "mlp.experts.*", layers: {n}, experts: "{16 * b}-{16 * b + 15}", source: '
                     f'{("gptq", "fp8")[b % 2]}}}\n' for n in range(3, layers) for b in range(EXPERTS // 16))
    return lines + '  - {match: "mlp.shared_experts.*", source: int8}\n  - {match: "lm_head", source: base}\n' \
        '  - {match: "mlp.*", moe: false, source: int8}\n'


def config(layers: int, qc: dict | None, mtp: bool = False) -> dict:
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": H,
           "intermediate_size": I_DENSE, "moe_intermediate_size": I_MOE, "num_hidden_layers": layers,
           "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "n_routed_experts": EXPERTS,
           "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
           "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE,
           "v_head_dim": V, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
           "norm_topk_prob": True, "routed_scaling_factor": 2.5, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
    if mtp:
        cfg["num_nextn_predict_layers"] = 1
    if qc:
        cfg["quantization_config"] = qc
    return cfg


def linears(layer: int) -> dict[str, tuple[int, int]]:
    p = f"model.layers.{layer}."
    out = {p + "self_attn.q_a_proj": (Q_LORA, H), p + "self_attn.q_b_proj": (HEADS * (NOPE + ROPE), Q_LORA),
           p + "self_attn.kv_a_proj_with_mqa": (KV_LORA + ROPE, H), p + "self_attn.kv_b_proj": (HEADS * (NOPE + V),
                                                                                              KV_LORA),
           p + "self_attn.o_proj": (H, HEADS * V)}
    if layer < 3:
        mlps = {"mlp": I_DENSE}
    else:
        mlps = {f"mlp.experts.{e}": I_MOE for e in range(EXPERTS)} | {"mlp.shared_experts": I_MOE}
    for m, inter in mlps.items():
        out |= {p + f"{m}.gate_proj": (inter, H), p + f"{m}.up_proj": (inter, H), p + f"{m}.down_proj": (H, inter)}
    return out


def quantized(kind: str, o: int, i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    if kind == "base":
        return {"weight": (torch.randn(o, i, generator=g) * 0.05).to(torch.bfloat16)}
    if kind == "fp8":
        magnitude = torch.randint(0, 0x7F, (o, i), generator=g, dtype=torch.uint8)  # 0x7F would be NaN
        w = (magnitude | (torch.randint(0, 2, (o, i), generator=g, dtype=torch.uint8) << 7)).view(torch.float8_e4m3fn)
        return {"weight": w, "weight_scale": torch.full((-(-o // 128), -(-i // 128)), 1e-3, dtype=torch.bfloat16)}
    if kind == "int8":
        return {"weight": torch.randint(-127, 128, (o, i), generator=g, dtype=torch.int8),
                "weight_scale": torch.full((o, 1), 1e-3, dtype=torch.bfloat16)}
    groups = -(-i // 128)
    return {"qweight": torch.randint(-2**31, 2**31 - 1, (i // 8, o), generator=g, dtype=torch.int32),
            "qzeros": torch.full((groups, o // 8), 0x77777777, dtype=torch.int32),
            "scales": torch.full((groups, o), 1e-3, dtype=torch.float16),
            "g_idx": torch.arange(i, dtype=torch.int32) // 128}


def make(root: Path, kind: str, layers: int, mtp: bool = False) -> None:
    """One shard per layer (memory: one layer); the other tensors (embeddings, norms, routers, head) are the base's
    bytes in every source, as a real quantizer leaves them."""
    d = root / kind
    d.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    last = layers + mtp  # the shard of the embeddings, final norm and head
    for layer in range(last + 1):
        g = torch.Generator().manual_seed(layer)
        same = torch.Generator().manual_seed(10_000 + layer)
        sd = {}
        if layer == layers and mtp:
            p = f"model.layers.{layer}."
            for n in ("enorm", "hnorm", "shared_head.norm"):
                sd[p + n + ".weight"] = torch.ones(H, dtype=torch.bfloat16)
            sd[p + "eh_proj.weight"] = (torch.randn(H, 2 * H, generator=same) * 0.05).to(torch.bfloat16)
            for n in ("embed_tokens", "shared_head.head"):
                sd[p + n + ".weight"] = (torch.randn(VOCAB, H, generator=same) * 0.05).to(torch.bfloat16)
        if layer == last:
            sd["model.embed_tokens.weight"] = (torch.randn(VOCAB, H, generator=same) * 0.05).to(torch.bfloat16)
            sd["lm_head.weight"] = (torch.randn(VOCAB, H, generator=same) * 0.05).to(torch.bfloat16)
            sd["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        else:
            for name, (o, i) in linears(layer).items():
                for s, t in quantized(kind, o, i, g).items():
                    sd[f"{name}.{s}"] = t
            p = f"model.layers.{layer}."
            for n, size in (("input_layernorm", H), ("post_attention_layernorm", H),
                            ("self_attn.q_a_layernorm", Q_LORA), ("self_attn.kv_a_layernorm", KV_LORA)):
                sd[p + n + ".weight"] = torch.ones(size, dtype=torch.bfloat16)
            if layer >= 3:
                sd[p + "mlp.gate.weight"] = (torch.randn(EXPERTS, H, generator=same) * 0.05).to(torch.bfloat16)
                sd[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(EXPERTS, dtype=torch.float32)
        fname = f"model-{layer:05d}-of-{last + 1:05d}.safetensors"
        save_file(sd, d / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in sd})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    qc = {"base": None, "fp8": CT_FP8, "int8": CT_INT8, "gptq": GPTQ}[kind]
    (d / "config.json").write_text(json.dumps(config(layers, qc, mtp), indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--mtp", action="store_true", help="add the MTP layer after the others")
    a = ap.parse_args(argv)
    for kind in ("base", "fp8", "int8", "gptq"):
        make(a.out, kind, a.layers, a.mtp)
    (a.out / "recipe.yaml").write_text(RECIPE)
    (a.out / "recipe-per-expert.yaml").write_text(per_expert_recipe(a.layers))


if __name__ == "__main__":
    main()
