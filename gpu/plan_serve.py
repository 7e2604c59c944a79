"""Serve a planned SmolLM2 checkpoint with SGLang (through the mpconvert shim) and measure its perplexity on the held-out
windows whose CPU perplexity (sensitivity.evaluate: float32, reference dequantizers) was recorded here beforehand.

Here (CPU):   .venv/bin/python gpu/plan_serve.py stage [--budget 6.5bpw]   # → .gpu-plan/ (chunks ≤ 50 MiB each)
There (GPU):  bash gpu/plan_serve.sh setup | part N | run                  # run: prints and writes RESULT json

The checkpoint exceeds one call's carry (64 MiB with the tracked tree), so stage ships it as a tar in chunks that
successive calls append on the GPU machine (files there survive between calls while it is held).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 50 * 2**20


def stage(budget: str) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from transformers import AutoModelForCausalLM

    from mpconvert import sensitivity
    from mpconvert.autoplan import prepare, run_plan
    from mpconvert.recipe import load_recipe
    from plan_bench import CALIB, EVAL, sources_file

    out = ROOT / ".gpu-plan"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir()
    with tempfile.TemporaryDirectory(prefix="mpc-plan-gpu-") as tmp:
        d = Path(tmp)
        src = sources_file(d)
        [r] = run_plan(prepare(src, [budget], CALIB, 512), d / "plan.yaml")
        recipe = d / "plan.yaml"
        recipe.write_text(r.recipe_text)
        subprocess.run([str(ROOT / ".venv/bin/mpconvert"), "build", str(recipe), "-o", str(d / "planned")], check=True)
        base = load_recipe(src, sources_only=True).path_of("base")
        ids = sensitivity.calibration_ids(base, EVAL, 1024)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        cpu = sensitivity.evaluate(load_recipe(recipe), EVAL, 1024, "cpu", model)
        (d / "planned" / "plan_eval.json").write_text(json.dumps(
            {"budget": budget, "windows": ids.tolist(), "cpu": cpu, "report": r.report | {"units": None},
             "recipe": r.recipe_text}))
        subprocess.run(f"tar -C {d} -cf - planned | split -b {CHUNK} -d - {out}/part.", shell=True, check=True)
    parts = sorted(out.iterdir())
    print(f"staged {len(parts)} parts: {[round(p.stat().st_size / 2**20, 1) for p in parts]} MiB; cpu {cpu}")


def serve(path: Path) -> dict:
    import sglang as sgl

    meta = json.loads((path / "plan_eval.json").read_text())
    windows = meta["windows"]
    e = sgl.Engine(model_path=str(path), attention_backend="triton", sampling_backend="pytorch",
                   grammar_backend="none", skip_tokenizer_init=True, log_level="error", dtype="auto",
                   mem_fraction_static=0.2, max_total_tokens=8192, disable_cuda_graph=True)
    try:
        out = e.generate(input_ids=windows, sampling_params={"max_new_tokens": 1, "temperature": 0},
                         return_logprob=True, logprob_start_len=0)
    finally:
        e.shutdown()
    nll, n = 0.0, 0
    for r in out:
        lps = [lp for lp, *_ in r["meta_info"]["input_token_logprobs"]][1:]  # the first token has no prediction
        nll -= sum(lps)
        n += len(lps)
    ppl = math.exp(nll / n)
    cpu = meta["cpu"]["perplexity"]
    return {"budget": meta["budget"], "tokens": n, "gpu_perplexity": round(ppl, 4), "cpu_perplexity": round(cpu, 4),
            "relative_difference": round(ppl / cpu - 1, 5), "cpu_kl": meta["cpu"]["kl"],
            "cpu_perplexity_base": meta["cpu"]["perplexity_base"], "bits_per_weight": meta["report"]["bits_per_weight"]}


if __name__ == "__main__":
    if sys.argv[1] == "stage":
        stage(sys.argv[sys.argv.index("--budget") + 1] if "--budget" in sys.argv else "6.5bpw")
    else:
        res = serve(Path(sys.argv[2]))
        print("RESULT " + json.dumps(res))
        Path(sys.argv[3]).write_text(json.dumps(res, indent=1) + "\n")
