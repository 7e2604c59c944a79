"""Synthesize a large Llama- or Qwen3-MoE-shaped model in each format, for the speed and memory runs (weights random,
formats exact).

Tensor names, shapes and dtypes come from mpconvert's format modules (`Format.expected`), quantization_config from a
real producer output of the same kind (templates.json, written by gpu/pack.py); values are random but well-formed
(positive scales, GPTQ v1 symmetric zeros, ordered g_idx) so mpconvert's checks and SGLang's kernels accept them.
Embeddings, norms and lm_head are the same bytes in every checkpoint (one seed). The bf16 base's linear weights are a
hole in a sparse file: build reads only their headers, and nothing serves the base.

Usage: synth.py OUT_DIR TEMPLATES_JSON TOKENIZER_DIR
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import torch

from mpconvert.formats import FORMATS

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
              num_hidden_layers=12, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
              max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
              hidden_act="silu", torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
# Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of 768, top-8, 32/4 heads of 128) with 8 of its 48 layers:
# 4.8 G expert parameters, so decode reads real expert weights; the rest of the config comes from the tiny fixture
MOE_SHAPE = dict(hidden_size=2048, num_hidden_layers=8, num_local_experts=128, num_experts_per_tok=8,
                 moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                 head_dim=128, vocab_size=32000, max_position_embeddings=4096)
DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32, "I8": torch.int8,
      "F8_E4M3": torch.float8_e4m3fn}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def is_moe(cfg) -> bool:
    return "num_local_experts" in cfg


def linears(cfg) -> list[tuple[str, int, int]]:
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [(f"{p}.self_attn.q_proj", q, h), (f"{p}.self_attn.k_proj", kv, h), (f"{p}.self_attn.v_proj", kv, h),
                (f"{p}.self_attn.o_proj", h, q)]
        if is_moe(cfg):
            m = cfg["moe_intermediate_size"]
            for e in range(cfg["num_local_experts"]):
                x = f"{p}.mlp.experts.{e}"
                out += [(f"{x}.gate_proj", m, h), (f"{x}.up_proj", m, h), (f"{x}.down_proj", h, m)]
        else:
            out += [(f"{p}.mlp.gate_proj", i, h), (f"{p}.mlp.up_proj", i, h), (f"{p}.mlp.down_proj", h, i)]
    return out


def support(cfg) -> list[tuple[str, str, tuple]]:
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", "BF16", (v, h)), ("model.norm.weight", "BF16", (h,)),
           ("lm_head.weight", "BF16", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", "BF16", (h,)), (f"{p}.post_attention_layernorm.weight", "BF16", (h,))]
        if is_moe(cfg):  # the router (never quantized) and Qwen3's q/k norms
            out += [(f"{p}.mlp.gate.weight", "BF16", (cfg["num_local_experts"], h)),
                    (f"{p}.self_attn.q_norm.weight", "BF16", (cfg["head_dim"],)),
                    (f"{p}.self_attn.k_norm.weight", "BF16", (cfg["head_dim"],))]
    return out


def moe_config(tiny: dict) -> dict:
    """The tiny fixture's Qwen3-MoE config at MOE_SHAPE (the rest, e.g. rope and norm_topk_prob, as it is)."""
    cfg = {k: v for k, v in tiny.items() if k != "quantization_config"}
    cfg.update(MOE_SHAPE)
    return cfg


def values(name: str, suffix: str, dtype: str, shape: tuple, fmt: str, params: dict, gen) -> torch.Tensor:
    t = DT[dtype]
    if suffix == "weight" and dtype == "BF16":
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=t, device=DEV) + 0.05 * torch.randn(shape, generator=gen, device=DEV).to(t)
        return (0.02 * torch.randn(shape, generator=gen, device=DEV)).to(t)
    if suffix == "weight" and dtype == "F8_E4M3":
        return torch.randn(shape, generator=gen, device=DEV).clamp(-400, 400).to(t)
    if suffix == "weight" and dtype == "I8":
        return torch.randint(-127, 128, shape, generator=gen, device=DEV, dtype=torch.int8)
    if suffix == "qweight":
        return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device=DEV, dtype=torch.int32)
    if suffix == "qzeros":
        z = 0x77777777 if fmt == "gptq" else 0x88888888  # GPTQ v1 stores zero−1 (sym: 8−1); AWQ the zero itself
        return torch.full(shape, z - (1 << 32) if z >= 1 << 31 else z, dtype=torch.int32, device=DEV)
    if suffix == "g_idx":
        return (torch.arange(shape[0], device=DEV) // params["group_size"]).to(torch.int32)
    if suffix in ("weight_scale", "weight_scale_inv", "scales", "input_scale"):
        base = {"fp8": 0.02, "int8": 0.02 / 73, "gptq": 0.02 / 4.6, "awq": 0.02 / 4.6}[fmt]
        return (base * (0.5 + torch.rand(shape, generator=gen, device=DEV))).to(t)
    raise ValueError(f"no synthetic values for {name}.{suffix} {dtype}")


def write_safetensors(path: Path, entries: list[tuple[str, str, tuple]], produce, hole: set[str] = frozenset()):
    """Stream a safetensors file: header first, then each tensor as `produce(name)` makes it; names in `hole` are
    left as a hole (sparse zeros)."""
    header, off = {}, 0
    for name, dtype, shape in entries:
        n = torch.tensor([], dtype=DT[dtype]).element_size()
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        start = f.tell()
        for name, dtype, shape in entries:
            if name in hole:
                continue
            f.seek(start + header[name]["data_offsets"][0])
            t = produce(name).contiguous().cpu()
            f.write(t.view(torch.uint8).numpy().tobytes())
        f.truncate(start + off)


def checkpoint(out: Path, cfg: dict, kind: str | None, tpl: dict | None, tokenizer: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    entries, maker = [], {}
    sup_gen = torch.Generator(device=DEV).manual_seed(1)
    for name, dtype, shape in support(cfg):
        entries.append((name, dtype, shape))
        maker[name] = (lambda n=name, d=dtype, s=shape: values(n, "weight", d, s, "", {}, sup_gen))
    gen = torch.Generator(device=DEV).manual_seed(2)
    hole = set()
    for mod, o, i in linears(cfg):
        if tpl is None:
            entries.append((f"{mod}.weight", "BF16", (o, i)))
            hole.add(f"{mod}.weight")
            continue
        fmt, params = tpl["format"], tpl["params"]
        for suffix, e in sorted(FORMATS[fmt].expected(params, o, i).items()):
            dtype = tpl["dtypes"].get(suffix, e.dtypes[0])  # as the real producer stores it
            shape = e.shape
            name = f"{mod}.{suffix}"
            entries.append((name, dtype, tuple(shape)))
            maker[name] = (lambda n=name, s=suffix, d=dtype, sh=tuple(shape): values(n, s, d, sh, fmt, params, gen))
    # support tensors are made first, in one order, so every checkpoint holds the same bytes for them
    support_names = [n for n, _, _ in support(cfg)]
    cache = {n: maker[n]().cpu() for n in support_names}
    write_safetensors(out / "model.safetensors", entries, lambda n: cache[n] if n in cache else maker[n](), hole)
    c = dict(cfg)
    if tpl is not None:
        c["quantization_config"] = dict(tpl["quantization_config"])
        if is_moe(cfg):  # the routers stay bf16: the template's ignore list names the tiny model's layers
            c["quantization_config"]["ignore"] = ["lm_head"] + [f"model.layers.{i}.mlp.gate"
                                                                for i in range(cfg["num_hidden_layers"])]
    (out / "config.json").write_text(json.dumps(c, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer / f).exists():
            shutil.copy(tokenizer / f, out / f)


def main(out: Path, templates: dict, tokenizer: Path, cfg: dict = CONFIG) -> dict[str, Path]:
    dirs = {"base": out / "base"}
    checkpoint(dirs["base"], cfg, None, None, tokenizer)
    for kind, tpl in templates.items():
        dirs[kind] = out / kind
        checkpoint(dirs[kind], cfg, kind, tpl, tokenizer)
    return dirs


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())["templates"], Path(sys.argv[3]))
