"""How much does the held-out perplexity of an activation-quantized SmolLM2 move under perturbations far below any
arithmetic difference between the CPU reference and a GPU kernel? Each seed multiplies every W8A8 layer's input by
(1 + eps·N(0,1)) before its activation quantization (eps 1e-5: a twentieth of one bf16 rounding), which flips a few
FP8/Int8 roundings and so draws another realization of the quantization noise. The spread says how many held-out
tokens a "GPU perplexity within 1% of the CPU's" comparison needs (docs/gpu-results.md §12).

    python bench/perplexity_noise.py [--recipes fp8,int8] [--tokens 1024,6144] [--seeds 5] [--eps 1e-5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import plan_bench as pb  # noqa: E402
from mpconvert import choose, sensitivity  # noqa: E402
from mpconvert.formats import FORMATS  # noqa: E402
from mpconvert.plan import Inputs  # noqa: E402
from mpconvert.recipe import load_recipe  # noqa: E402


def perturb(eps: float, gen) -> None:
    """Every format that quantizes activations (W8A8 Int8 and FP8) quantizes a perturbed input from now on."""
    import torch

    from mpconvert.formats.base import Format

    for cls in {type(f) for f in FORMATS.values()}:
        quantize = cls.quantize_activations
        if quantize is Format.quantize_activations:
            continue

        def perturbed(self, x, p, t, quantize=quantize):
            return quantize(self, x * (1 + eps * torch.randn(x.shape, generator=gen)), p, t)

        cls.quantize_activations = perturbed


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="fp8,int8", help="all-<source> recipes of bench/plan_bench.py's sources")
    ap.add_argument("--tokens", default="1024,6144")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--eps", type=float, default=1e-5)
    a = ap.parse_args(argv)
    gen = torch.Generator()
    perturb(a.eps, gen)
    print("| recipe | held-out tokens | perplexity per seed | mean | standard deviation |")
    print("|---|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="mpc-noise-") as tmp:
        d = Path(tmp)
        src = pb.sources_file(d)
        recipe = load_recipe(src, sources_only=True)
        c = choose.candidates(Inputs.open(recipe))
        model = sensitivity.base_model(recipe.path_of("base"), "cpu")
        for label in a.recipes.split(","):
            r = load_recipe(pb.assignment_recipe(d, f"all-{label}", src, c, {u: label for u in c.units}))
            for tokens in (int(t) for t in a.tokens.split(",")):
                ids = sensitivity.calibration_ids(recipe.tokenizer_dirs(), pb.EVAL, tokens)
                ppl = []
                for seed in range(a.seeds):
                    gen.manual_seed(seed)
                    ppl.append(sensitivity.evaluate(r, None, 0, "cpu", model, ids=ids)["perplexity"])
                mean = statistics.mean(ppl)
                print(f"| all {label} | {ids.numel()} | {', '.join(f'{p:.3f}' for p in ppl)} | {mean:.3f} | "
                      f"{100 * statistics.stdev(ppl) / mean:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
