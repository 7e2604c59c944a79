"""Issue 17 on the GPU: the new formats served by SGLang, and the compressed-tensors export served by stock SGLang
(no plugin) giving the same greedy tokens as the mpconvert-layout build through the shim.

Here (CPU):   .venv/bin/python gpu/formats_serve.py stage      # → .gpu-plan/ (chunks ≤ 50 MiB each)
There (GPU):  bash gpu/plan_serve.sh setup | part DIR | formats [RUN…]  # RESULT json → $OUT/formats_serve.json
              (RUN: mix, mix-ct, moe, moe-ct; each run's outputs persist in $OUT/../formats-runs between calls)

Staged: (1) the real SmolLM2-135M mixed from five real sources — attention FP8-dynamic, MLP of layers 0-7 W8A8
Int8, 8-15 GPTQ g64 (gptqmodel), 16-23 compressed-tensors W4A16 g64 (llm-compressor GPTQ), 24-29 W4A16 g64 with zero
points (llm-compressor) — built twice from one recipe: the mpconvert layout (`mix`) and --to compressed-tensors
(`mix-ct`: GPTQ repacked into pack-quantized); with the CPU reference perplexity of the recipe on held-out text
(sensitivity.evaluate: reference dequantizers, float32). (2) The taught Qwen3-MoE, attention Int8 and experts GPTQ,
in both layouts (served in float16: GPTQ-Marlin MoE runs fp16 only).
On the GPU: each directory served with SGLang's Engine — the mpconvert ones through the shim, the exports with
SGLANG_PLUGINS set to nothing (stock SGLang) — greedy tokens and input logprobs of the held-out windows compared.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "gpu"))
from plan_serve import _perplexity, staging  # noqa: E402

SMOL = {"fp8": "fp8-dynamic", "int8": "w8a8", "gptq": "gptq-g64", "w4": "ct-gptq-w4a16-g64",
        "w4a": "ct-w4a16-asym-g64"}
SMOL_RULES = """rules:
  - {match: "self_attn.*", source: fp8}
  - {match: "mlp.*", layers: "0-7", source: int8}
  - {match: "mlp.*", layers: "8-15", source: gptq}
  - {match: "mlp.*", layers: "16-23", source: w4}
  - {match: "mlp.*", layers: "24-29", source: w4a}
"""
MOE = {"int8": "ct-w8a8", "gptq": "gptq"}
MOE_RULES = """rules:
  - {match: "self_attn.*", source: int8}
"""


def _recipe(d: Path, base: Path, sources: dict[str, Path], default: str, rules: str) -> Path:
    text = f"base: {json.dumps(str(base))}\nsources:\n"
    text += "".join(f"  {k}: {json.dumps(str(v))}\n" for k, v in sources.items())
    p = d / f"recipe-{default}.yaml"
    p.write_text(text + f"default: {default}\n" + rules)
    return p


def _build(recipe: Path, out: Path, *extra: str) -> None:
    subprocess.run([str(ROOT / ".venv/bin/mpconvert"), "build", str(recipe), "-o", str(out), *extra], check=True)


def stage() -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from transformers import AutoModelForCausalLM

    from fixtures.factory import fixture, smollm2, taught_text
    from mpconvert import sensitivity
    from mpconvert.recipe import load_recipe
    from plan_bench import EVAL

    with staging("formats") as tmp:
        d = tmp / "formats"
        d.mkdir()
        recipe = _recipe(d, smollm2("base"), {k: smollm2(v) for k, v in SMOL.items()}, "w4", SMOL_RULES)
        _build(recipe, d / "mix")
        _build(recipe, d / "mix-ct", "--to", "compressed-tensors")
        base = smollm2("base")
        ids = sensitivity.calibration_ids([base], EVAL, 1024)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        cpu = sensitivity.evaluate(load_recipe(recipe), EVAL, 1024, "cpu", model)
        moe = _recipe(d, fixture("qwen3moe-taught", "base"), {k: fixture("qwen3moe-taught", v) for k, v in MOE.items()},
                      "gptq", MOE_RULES)
        _build(moe, d / "moe")
        _build(moe, d / "moe-ct", "--to", "compressed-tensors")
        held = taught_text(tmp / "held.txt", seed=7)
        moe_ids = [[int(w[1:]) + 3 for w in line.split()] for line in held.read_text().splitlines()[:8]]
        (d / "eval.json").write_text(json.dumps({"windows": ids.tolist(), "cpu": cpu, "moe_windows": moe_ids}))
    print(f"cpu {cpu}")


def _served(path: Path, windows: list, dtype: str, shim: bool) -> dict:
    """Serve in a child process (one Engine per process; SGLANG_PLUGINS empties the plugin list for stock SGLang)."""
    env = dict(os.environ)
    if not shim:
        env["SGLANG_PLUGINS"] = "no-plugins"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(windows, f)
    p = subprocess.run([sys.executable, __file__, "one", str(path), f.name, dtype], env=env, capture_output=True,
                       text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("ONE ")]
    if not line:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:400]}
    return json.loads(line[-1][4:])


def _one(path: str, windows_file: str, dtype: str) -> None:
    import sglang as sgl

    windows = json.loads(Path(windows_file).read_text())
    e = sgl.Engine(model_path=path, attention_backend="triton", sampling_backend="pytorch", grammar_backend="none",
                   skip_tokenizer_init=True, log_level="error", dtype=dtype, mem_fraction_static=0.2,
                   max_total_tokens=8192, disable_cuda_graph=True)
    try:
        out = e.generate(input_ids=windows, sampling_params={"max_new_tokens": 16, "temperature": 0},
                         return_logprob=True, logprob_start_len=0)
    finally:
        e.shutdown()
    print("ONE " + json.dumps({"tokens": [r["output_ids"] for r in out],
                               "lps": [lp for r in out for lp, *_ in r["meta_info"]["input_token_logprobs"][1:]]}))


def _compare(a: dict, b: dict) -> dict:
    if "error" in a or "error" in b:
        return {"error": a.get("error") or b.get("error")}
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    return {"identical_greedy_tokens": a["tokens"] == b["tokens"], "windows_identical": f"{same}/{len(a['tokens'])}",
            "max_input_logprob_diff": round(max(abs(x - y) for x, y in zip(a["lps"], b["lps"])), 5),
            "perplexity_shim": _perplexity(a["lps"]), "perplexity_export": _perplexity(b["lps"])}


RUNS = {"mix": ("windows", "auto", True), "mix-ct": ("windows", "auto", False),
        "moe": ("moe_windows", "float16", True), "moe-ct": ("moe_windows", "float16", False)}


def serve(d: Path, out: Path, only: list[str]) -> dict:
    """Each run's outputs are kept in out/NAME.json as it finishes (a call that runs out of time keeps what it did;
    the next call does the rest), then the comparisons."""
    import time

    meta = json.loads((d / "eval.json").read_text())
    got = {}
    for name, (windows, dtype, shim) in RUNS.items():
        f = out / f"{name}.json"
        if not f.exists() and (not only or name in only):
            t = time.perf_counter()
            r = _served(d / name, meta[windows], dtype, shim)
            f.write_text(json.dumps(r | {"seconds": round(time.perf_counter() - t, 1)}))
            print(f"{name}: {'error ' + r['error'] if 'error' in r else 'served'} in {time.perf_counter() - t:.0f} s",
                  flush=True)
        if f.exists():
            got[name] = json.loads(f.read_text())
    res = {}
    if "mix" in got and "mix-ct" in got:
        res["smollm2"] = _compare(got["mix"], got["mix-ct"])
    if "mix" in got and "error" not in got["mix"]:
        ppl, cpu = _perplexity(got["mix"]["lps"]), meta["cpu"]["perplexity"]
        res["smollm2_shim_vs_cpu"] = {"gpu_perplexity": ppl, "cpu_perplexity": round(cpu, 4),
                                      "relative_difference": round(ppl / cpu - 1, 5), "cpu_kl": meta["cpu"]["kl"]}
    if "moe" in got and "moe-ct" in got:
        res["taught_moe_fp16"] = _compare(got["moe"], got["moe-ct"])
    res["seconds"] = {k: v.get("seconds") for k, v in got.items()}
    return res


if __name__ == "__main__":
    if sys.argv[1] == "stage":
        stage()
    elif sys.argv[1] == "one":
        _one(*sys.argv[2:5])
    else:
        out = Path(sys.argv[3])
        res = serve(Path(sys.argv[2]), out, sys.argv[4:])
        print("RESULT " + json.dumps(res))
        (out / "formats_serve.json").write_text(json.dumps(res, indent=1) + "\n")
