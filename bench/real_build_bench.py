"""`mpconvert build` on the real SmolLM2-135M (few, large tensors) against `cp -r && sync` of the same output, in one
run: attention from llm-compressor's FP8-dynamic, MLP down_proj from its W8A8, the rest from gptqmodel's GPTQ-g64
(the real quantizers' outputs, made and cached by fixtures/). Each command runs --runs times and the fastest counts
(noise on a shared VM only ever adds time); the build's peak RSS is the largest.

    python bench/real_build_bench.py [--runs 5] [--workdir /tmp/mpc-real-bench]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from scale_bench import MPCONVERT, best  # noqa: E402

SOURCES = {"fp8": "fp8-dynamic", "int8": "w8a8", "gptq": "gptq-g64"}
RECIPE = """base: {base}
sources: {{{sources}}}
default: gptq
rules:
  - {{match: "self_attn.*", source: fp8}}
  - {{match: "mlp.down_proj", source: int8}}
"""


def real_job() -> tuple[str, list[Path]]:
    """The recipe over the real quantizers' SmolLM2 outputs (made and cached by fixtures/), and its source files."""
    from fixtures.factory import smollm2

    paths = {"base": smollm2("base"), **{k: smollm2(v) for k, v in SOURCES.items()}}
    recipe = RECIPE.format(base=paths["base"], sources=", ".join(f"{k}: {paths[k]}" for k in SOURCES))
    return recipe, [f for p in paths.values() for f in p.glob("*.safetensors")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mpc-real-bench"))
    a = ap.parse_args(argv)
    d = a.workdir
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    recipe, files = real_job()
    (d / "recipe.yaml").write_text(recipe)
    subprocess.run(["cat", *map(str, files)], check=True, stdout=subprocess.DEVNULL)  # page cache warm for all
    build_s, rss = best([MPCONVERT, "build", "recipe.yaml", "-o", "out", "--json"], d, a.runs, before="rm -rf out")
    cp_s, _ = best(["sh", "-c", "cp -r out copy && sync"], d, a.runs, before="rm -rf copy")
    out_mb = sum(p.stat().st_size for p in (d / "out").iterdir()) / 1e6
    print("| output MB | build s | `cp -r && sync` s | build / copy | build peak RSS GiB |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {out_mb:.0f} | {build_s:.2f} | {cp_s:.2f} | {build_s / cp_s:.2f} | {rss / 2**30:.2f} |")


if __name__ == "__main__":
    main()
