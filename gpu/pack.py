"""Stage what one GPU run needs into the ignored folder .gpu/ (carried by the device tool; 64 MiB in all).

Usage: .venv/bin/python gpu/pack.py PART [SHARED_GPU_DIR] [--no-site]   (PART: a key of PARTS below)

GPU_STAGE=.gpu-p2 stages into another ignored folder (carry it, and pass the same GPU_STAGE to gpu/e2e.sh), so that
two parts can run back to back on one warm machine; --no-site leaves SGLang out for such a second call (the first
call unpacked it to /tmp/site there), which keeps a part that would not fit under the carry limit; --no-kernels
leaves the kernel cache out too, for a second part whose kernels the first call's cache holds (gemma3's holds
olmo2's, stablelm's and glm4moe's).

- the SGLang 0.5.17 bundle from ../shared/gpu;
- one sm_90a kernel cache of built kernels only (the .so files, which SGLang loads directly): the shared bundle's,
  the one an earlier run brought back (gpu/results/tvmcache.tar.xz) and the ones gpu/prebuild_kernels.py compiled
  here (gpu/results/kernels/), none of them committed;
- the real quantizer outputs (cached fixtures) of the part's tiny model, as they are;
- part.json's templates: the quantization_config and module scheme of each fixture kind from which the GPU run
  synthesizes a large model of the same formats (gpu/synth.py; dense: Llama, experts: Qwen3-MoE).
Dense and MoE fixtures together are over the carry limit, so each part is one run; fixtures travel as one tar.xz, and
every part but dense gets an SGLang bundle without what serving never reads (FlashInfer's CUTLASS/CCCL JIT headers —
attention runs on Triton —, SGLang's diffusion and test packages, its gRPC and Rust servers) to fit.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's fixture factory (fixtures/)
from fixtures.factory import DEEPSEEK_MTP, SCRIPTS, deepseek_mla, fixture  # noqa: E402
from fixtures.mtp import with_mtp_layer  # noqa: E402
from mpconvert.sources import open_source

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / os.environ.get("GPU_STAGE", ".gpu")
# part → [(fixture arch, kinds, folder under fixtures/ ("" for the part's only set))]
PARTS = {
    "dense": [("llama", ("base", "ct-fp8-static", "ct-fp8-block", "ct-w8a8", "gptq", "awq", "native-fp8-block"), "")],
    "moe": [("qwen3moe", ("base", "ct-fp8-block", "ct-w8a8", "gptq", "awq"), "")],
    # expert-level mixed precision (issue 5) and the GPTQ MoE pair issue 6 still lacked; AWQ cannot mix in a layer
    "experts": [("qwen3moe", ("base", "ct-fp8-block", "ct-w8a8", "gptq"), "")],
    # TP=2 vs TP=1 greedy identity on taught (confident) models: the dense mixed recipe's four sources and the
    # mixed-experts recipe's two, then the experts decode speed (its templates below)
    # DeepSeek-V2 (MLA attention, a dense first layer, shared + routed experts) at the real models' MLA sizes
    # (fixtures/deepseek_mla.py: SGLang's GPU attention does not run the CPU tests' kv_lora_rank 128)
    "deepseek": [("deepseek-mla", ("base", "ct-fp8-block", "ct-w8a8", "gptq"), "")],
    # the same at hidden_size 512 (fixtures/deepseek_mtp.py says why) as DeepSeek-V3 checkpoints with one
    # multi-token-prediction layer (fixtures/mtp.py), for speculative decoding (NEXTN)
    "mtp": [("deepseek-mtp", ("base", "ct-fp8-block", "gptq"), "")],
    # DeepSeek-V3 at its real expert counts (fixtures/deepseek_v3.py): where SGLang fuses the shared expert on a GPU
    # (no GPTQ: the three sources' 40 MiB, compressed, leave no room for it under the carry limit)
    "deepseek_v3": [("deepseek_v3", ("base", "ct-fp8-block", "ct-w8a8"), "")],
    # dense Qwen2 (q/k/v bias) and Qwen3 (q_norm/k_norm), both with a tied head: every format through SGLang's own
    # Qwen2/Qwen3 classes, AWQ's pairs and SmoothQuant among them
    "qwen2": [("qwen2", ("base", "ct-fp8-dynamic", "ct-w8a8", "ct-w8a8-smooth", "gptq", "awq"), "")],
    "qwen3": [("qwen3", ("base", "ct-fp8-dynamic", "ct-w8a8", "ct-w8a8-smooth", "gptq", "awq"), "")],
    # GLM-4.5's MoE (a dense first layer, shared expert, biased router and q/k/v): FP8 and Int8 experts in one layer
    "glm4moe": [("glm4moe", ("base", "ct-fp8-block", "ct-w8a8"), "")],
    # dense Gemma 3 (text; llm-compressor only: no GPTQ/AWQ producer here quantizes it), OLMo 2 (post-norm block) and
    # StableLM 2 (attention built unquantized by SGLang): the refused sources ride along, served as they are
    "gemma3": [("gemma3", ("base", "ct-fp8-dynamic", "ct-w8a8", "ct-w8a8-smooth", "ct-w4a16"), "")],
    "olmo2": [("olmo2", ("base", "ct-fp8-dynamic", "ct-w8a8", "ct-w4a16", "gptq", "awq"), "")],
    "stablelm": [("stablelm", ("base", "ct-fp8-dynamic", "gptq"), "")],
    "tp": [("llama-taught", ("base", "ct-fp8-static", "ct-w8a8", "gptq", "awq"), "llama"),
           ("qwen3moe-taught", ("base", "ct-fp8-block", "ct-w8a8"), "moe")],
}
# the large synthetic models' formats, and the module whose scheme each template takes (dense: speed and memory;
# experts: decode speed of expert-level mixed precision)
SYNTH = {"dense": ("llama", ("ct-fp8-dynamic", "ct-w8a8", "gptq", "awq"), "model.layers.0.self_attn.q_proj"),
         "experts": ("qwen3moe", ("ct-fp8-block", "ct-w8a8"), "model.layers.0.mlp.experts.0.gate_proj")}
SYNTH["tp"] = SYNTH["experts"]
KEEP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def templates(part: str) -> dict:
    if part not in SYNTH:
        return {}
    arch, kinds, module = SYNTH[part]
    out = {}
    for kind in kinds:
        d = fixture(arch, kind)
        src = open_source(kind, d, arch)
        m = src.modules[module]
        out[kind] = {"quantization_config": json.loads((d / "config.json").read_text())["quantization_config"],
                     "format": m.scheme.format, "params": m.scheme.params,
                     "dtypes": {suffix: t.dtype for suffix, t in m.tensors.items()}}
    return out


# kernels a part never runs, left out to keep under the carry limit: the dense parts have no MoE and run GPTQ/AWQ in
# bf16; the experts part runs GPTQ in fp16 only, without an expert map (the shim's Marlin groups weight other groups'
# slots 0 instead), and no AWQ
UNUSED_KERNELS = {**dict.fromkeys(("dense", "qwen2", "qwen3", "gemma3", "olmo2", "stablelm"),
                                  ("moe_wna16_marlin", "gptq_marlin_fp16_t")),
                  "glm4moe": ("gptq_marlin_bf16_t", "gptq_marlin_fp16_t", "moe_wna16_marlin_bf16_t",
                              "moe_wna16_marlin_fp16_t_true", "awq_marlin_repack"),
                  "moe": ("moe_wna16_marlin_fp16_t_true",),
                  "experts": ("gptq_marlin_bf16_t", "moe_wna16_marlin_bf16_t", "moe_wna16_marlin_fp16_t_true",
                              "awq_marlin_repack"),
                  # GPTQ only in the mixed model's experts (fp16; MLA projections cannot be GPTQ), no AWQ
                  "deepseek": ("gptq_marlin_bf16_t", "gptq_marlin_fp16_t", "moe_wna16_marlin_bf16_t",
                               "moe_wna16_marlin_fp16_t_true", "awq_marlin_repack"),
                  "mtp": ("gptq_marlin_bf16_t", "gptq_marlin_fp16_t", "moe_wna16_marlin_bf16_t",
                          "moe_wna16_marlin_fp16_t_true", "awq_marlin_repack"),
                  # bf16 only (dense GPTQ/AWQ on Marlin, MoE on Triton); its static FP8 still runs an fp16 kernel
                  "tp": ("moe_wna16_marlin", "gptq_marlin_fp16_t", "activation_fp16_t", "custom_all_reduce_fp16_t",
                         "fused_rope_true_64_true_fp16_t", "per_token_group_quant_fp16_t", "qknorm_64_true_fp16_t")}


def kernel_cache(part: str, shared: Path, dst: Path) -> None:
    """Merge every kernel cache there is into one tar.xz of `tvmcache/<build dir>/<module>.so` (objects, sources and
    ninja files left out: SGLang loads a built .so without them)."""
    results = ROOT / "gpu" / "results"
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "tvmcache"
        for tarball in (shared / "sglang-0.5.17-jit-sm90.tar.xz", results / "tvmcache.tar.xz"):
            if tarball.exists():
                subprocess.run(["tar", "-C", tmp, "-xJf", str(tarball)], check=True)
        if (results / "kernels").is_dir():
            shutil.copytree(results / "kernels", merged, dirs_exist_ok=True)
        keep = sorted(p.relative_to(tmp) for p in merged.glob("*/*.so")
                      if not any(u in p.name for u in UNUSED_KERNELS.get(part, ())))
        subprocess.run(["tar", "-C", tmp, "-cJf", str(dst), *map(str, keep)], check=True)
    print(f"kernel cache: {len(keep)} built kernels, {dst.stat().st_size / 2**20:.1f} MiB")


SLIM = ("./flashinfer/data/cutlass", "./flashinfer/data/cccl", "./sglang/multimodal_gen", "./sglang/test",
        # the gRPC server (--grpc-mode) and the Rust server (SGLANG_RUST_SERVER): imported only when asked for
        "./sglang/srt/grpc/_core.cpython-312-x86_64-linux-gnu.so",
        "./sglang/srt/server/_core.cpython-312-x86_64-linux-gnu.so")


def slim_site(src: Path, dst: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-C", tmp, "-xJf", str(src)], check=True)
        for d in map(Path(tmp).joinpath, SLIM):
            shutil.rmtree(d) if d.is_dir() else d.unlink()
        subprocess.run(f"tar -C {tmp} -cf - . | xz -6 -T8 > {dst}", shell=True, check=True)


def main(part: str, shared: Path, site: bool = True, kernels: bool = True) -> None:
    if STAGE.exists():
        shutil.rmtree(STAGE)
    (STAGE / "fixtures").mkdir(parents=True)
    if kernels:
        kernel_cache(part, shared, STAGE / "sglang-0.5.17-jit-sm90.tar.xz")
    if site and part != "dense":
        slim_site(shared / "sglang-0.5.17-site.tar.xz", STAGE / "sglang-0.5.17-site.tar.xz")
    elif site:
        shutil.copy(shared / "sglang-0.5.17-site.tar.xz", STAGE)
    scratch = tempfile.TemporaryDirectory()
    for arch, kinds, folder in PARTS[part]:
        for kind in kinds:
            src = deepseek_mla(kind) if arch == "deepseek-mla" else \
                deepseek_mla(kind, script=SCRIPTS[arch]) if arch in SCRIPTS else \
                fixture(arch, kind) if arch != "deepseek-mtp" else \
                with_mtp_layer(deepseek_mla(kind, script=DEEPSEEK_MTP), Path(scratch.name) / kind)
            dst = STAGE / "fixtures" / folder / kind
            dst.mkdir(parents=True)
            for f in KEEP:
                if (src / f).exists():
                    shutil.copy(src / f, dst / f)
    scratch.cleanup()
    subprocess.run(f"tar -C {STAGE} -cf - fixtures | xz -6 -T4 > {STAGE}/fixtures.tar.xz", shell=True, check=True)
    shutil.rmtree(STAGE / "fixtures")
    sets = {folder: list(kinds) for _, kinds, folder in PARTS[part]}
    (STAGE / "part.json").write_text(json.dumps({"part": part, "arch": PARTS[part][0][0], "kinds": sets.get(""),
                                                 "sets": sets, "templates": templates(part)}, indent=1))
    size = sum(p.stat().st_size for p in STAGE.rglob("*") if p.is_file())
    tree = sum((ROOT / f).stat().st_size for f in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                                                                  text=True).stdout.splitlines() if (ROOT / f).is_file())
    print(f"staged {part} into {STAGE}: {size / 2**20:.1f} MiB; with the tracked tree {(size + tree) / 2**20:.1f} MiB"
          f"{' — over the 64 MiB the device tool carries' if size + tree > 64 * 2**20 else ''}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a not in ("--no-site", "--no-kernels")]
    main(args[0], Path(args[1]) if len(args) > 1 else ROOT.parent / "shared" / "gpu", "--no-site" not in sys.argv,
         "--no-kernels" not in sys.argv)
