"""Stage what one GPU run needs into the ignored folder .gpu/ (carried by the device tool; 64 MiB in all).

Usage: .venv/bin/python gpu/pack.py dense|moe [SHARED_GPU_DIR]

- the SGLang 0.5.17 bundle and its sm_90 kernel cache from ../shared/gpu (or, in its place, the fuller cache an earlier
  run brought back, gpu/results/tvmcache.tar.xz, not committed);
- the real quantizer outputs (cached fixtures) of the part's tiny model, as they are;
- templates.json: the quantization_config and module scheme of each llama fixture kind, from which the GPU run
  synthesizes a large model of the same formats (gpu/synth.py).
Dense and MoE fixtures together are over the carry limit, so each part is one run; fixtures travel as one tar.xz, and
the MoE part's SGLang bundle leaves out what serving never reads (FlashInfer's CUTLASS/CCCL JIT headers — attention
runs on Triton — and SGLang's diffusion and test packages) to fit.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mpconvert.demo import fixture
from mpconvert.sources import open_source

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".gpu"
PARTS = {
    "dense": ("llama", ("base", "ct-fp8-static", "ct-fp8-block", "ct-w8a8", "gptq", "awq", "native-fp8-block")),
    "moe": ("qwen3moe", ("base", "ct-fp8-block", "ct-w8a8", "gptq", "awq")),
    # expert-level mixed precision (issue 5) and the GPTQ MoE pair issue 6 still lacked; AWQ cannot mix in a layer
    "experts": ("qwen3moe", ("base", "ct-fp8-block", "ct-w8a8", "gptq")),
}
SYNTH_KINDS = ("ct-fp8-dynamic", "ct-w8a8", "gptq", "awq")  # the large synthetic model's formats (dense part)
KEEP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def templates() -> dict:
    out = {}
    for kind in SYNTH_KINDS:
        d = fixture("llama", kind)
        src = open_source(kind, d, "llama")
        m = src.modules["model.layers.0.self_attn.q_proj"]
        out[kind] = {"quantization_config": json.loads((d / "config.json").read_text())["quantization_config"],
                     "format": m.scheme.format, "params": m.scheme.params,
                     "dtypes": {suffix: t.dtype for suffix, t in m.tensors.items()}}
    return out


SLIM = ("./flashinfer/data/cutlass", "./flashinfer/data/cccl", "./sglang/multimodal_gen", "./sglang/test")


def slim_site(src: Path, dst: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-C", tmp, "-xJf", str(src)], check=True)
        for d in SLIM:
            shutil.rmtree(Path(tmp) / d)
        subprocess.run(f"tar -C {tmp} -cf - . | xz -6 -T8 > {dst}", shell=True, check=True)


def main(part: str, shared: Path) -> None:
    arch, kinds = PARTS[part]
    if STAGE.exists():
        shutil.rmtree(STAGE)
    (STAGE / "fixtures").mkdir(parents=True)
    # a cache brought back by an earlier run holds the shared one plus what that run compiled: use it instead
    extra = ROOT / "gpu" / "results" / "tvmcache.tar.xz"
    shutil.copy(extra if extra.exists() else shared / "sglang-0.5.17-jit-sm90.tar.xz",
                STAGE / "sglang-0.5.17-jit-sm90.tar.xz")
    if part in ("moe", "experts"):
        slim_site(shared / "sglang-0.5.17-site.tar.xz", STAGE / "sglang-0.5.17-site.tar.xz")
    else:
        shutil.copy(shared / "sglang-0.5.17-site.tar.xz", STAGE)
    for kind in kinds:
        src = fixture(arch, kind)
        dst = STAGE / "fixtures" / kind
        dst.mkdir()
        for f in KEEP:
            if (src / f).exists():
                shutil.copy(src / f, dst / f)
    subprocess.run(f"tar -C {STAGE} -cf - fixtures | xz -6 -T4 > {STAGE}/fixtures.tar.xz", shell=True, check=True)
    shutil.rmtree(STAGE / "fixtures")
    (STAGE / "part.json").write_text(json.dumps({"part": part, "arch": arch, "kinds": list(kinds),
                                                 "templates": templates() if part == "dense" else {}}, indent=1))
    size = sum(p.stat().st_size for p in STAGE.rglob("*") if p.is_file())
    print(f"staged {part} into {STAGE}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT.parent / "shared" / "gpu")
