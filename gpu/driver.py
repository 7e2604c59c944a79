"""The GPU proof, one part per run (see gpu/e2e.sh): build with mpconvert, serve with real SGLang, compare, report.

Usage: driver.py PART OUT_DIR   (PART: a key of PARTS below, or experts|mtp|tp; needs the staged .gpu/ folder:
gpu/pack.py)
Env: E2E_FIDELITY=1 (default) runs the fidelity part, E2E_SPEED=1 the speed part; E2E_PAR engines at once (8);
E2E_BUDGET_S stops starting engines after that many seconds; E2E_DRY=1 builds and reports without engines;
E2E_NO_CUSTOM_AR=1 starts TP=2 Engines with --disable-custom-all-reduce;
E2E_MEMORY=1 (dense) the weight-memory part alone, all Engines at once on one GPU;
E2E_ONLY=a,b runs only those fidelity Engines (dense/moe fidelity, experts); E2E_CHILD_TIMEOUT per Engine (420 s).
TP>1 Engines run with FlashInfer's all-reduce fusion off (engine_child.py says why).

fidelity  every servable source S and the checkpoint built from a recipe taking everything from S are served in their
          own Engines; greedy tokens and top-5 logprobs must be identical. Mixed recipes (≥ 3 formats) serve, and their
          teacher-forced logprobs vs the bf16 model are reported beside their parts'. TP=2 vs TP=1 on the mixed model.
speed     (dense part) a 12-layer Llama-8B-shaped model synthesized in FP8, Int8, GPTQ and AWQ, and a mixed build of
          3 layers of each: decode tokens/s (CUDA graphs on), load time and SGLang's weight memory per checkpoint.
experts   expert-level mixed precision (issue 5) and the MoE GPTQ pair: see experts(); with E2E_SPEED=1 also the decode
          speed of mixed-experts layers on a Qwen3-30B-A3B-shaped synthetic model (experts_speed()).
mtp       DeepSeek-V3 with its MTP layer served with speculative decoding (NEXTN): see mtp().
tp        TP=2 / EP=2 vs TP=1 greedy identity of mixed checkpoints of taught models (tp_identity()); with E2E_SPEED=1
          also experts_speed().
Results: OUT/results.json, OUT/report.md (also printed), OUT/logs.tar.xz (every Engine's log).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import yaml

from mpconvert.manifest import as_json, load_manifest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the repository's fixture factory (fixtures/)
STAGE = ROOT / os.environ.get("GPU_STAGE", ".gpu")
WORK = Path("/tmp/e2e")
T0 = time.time()
BUDGET_S = float(os.environ.get("E2E_BUDGET_S", "540"))  # stop starting new work after this (the call has 600 s)
SMALL = {"mem_fraction": 0.05, "max_total_tokens": 2048}  # an Engine of a tiny model, many side by side on one GPU

DENSE_MIXED = """
- {match: "self_attn.*", layers: 0, source: ct-fp8-static}
- {match: "mlp.*", layers: 0, source: ct-w8a8}
- {match: "self_attn.*", layers: 1, source: awq}
"""  # default gptq: layer 1 mlp and nothing else
MOE_MIXED = """
- {match: "mlp.experts.*", layers: 0, source: ct-fp8-block}
- {match: "mlp.experts.*", layers: 1, source: awq}
- {match: "self_attn.*", layers: 0, source: ct-w8a8}
"""  # default gptq: layer 1 attention (dense GPTQ-Marlin runs bf16)
# DeepSeek-V2: FP8-block attention in layer 0, Int8 in layer 1, but kv_b_proj bf16 (SGLang absorbs a quantized one in
# bfloat16, and this model runs in fp16: rules.dtype_problems); the dense first MLP Int8; the shared experts FP8; layer
# 1's routed experts half FP8, half GPTQ (default: GPTQ-Marlin MoE runs fp16 only; MLA projections cannot be GPTQ, so
# every attention rule is explicit). The pure FP8 and Int8 builds (bf16) serve a quantized kv_b_proj.
DEEPSEEK_MIXED = """
- {match: "self_attn.kv_b_proj", source: base}
- {match: "self_attn.*", layers: 0, source: ct-fp8-block}
- {match: "self_attn.*", layers: 1, source: ct-w8a8}
- {match: "mlp.*", layers: 0, source: ct-w8a8}
- {match: "mlp.shared_experts.*", source: ct-fp8-block}
- {match: "mlp.experts.*", experts: "0-3", source: ct-fp8-block}
"""
# DeepSeek-V3 at its real expert counts (256 routed, 1 shared: SGLang fuses the shared expert into the FusedMoE on a
# GPU): attention and routed experts 0-127 FP8-block; the dense first MLP, the shared experts and routed experts
# 128-255 Int8 (default) — the shim must turn fusion off. "shared-apart": every routed expert FP8-block, the shared
# ones Int8 (one routed format, yet no fusion either). The sources and the pure builds (one format throughout) must
# fuse.
DEEPSEEK_V3_MIXED = """
- {match: "self_attn.*", source: ct-fp8-block}
- {match: "mlp.experts.*", experts: "0-127", source: ct-fp8-block}
"""
SHARED_APART = """
- {match: "mlp.shared_experts.*", source: ct-w8a8}
"""
# Dense Qwen2/Qwen3: FP8 attention with its bias (Qwen2) in layer 0, SmoothQuant's Int8 MLP (its smoothed
# post_attention_layernorm along), AWQ's whole attention in layer 1 (its folded input_layernorm along); default GPTQ
# (layer 1's MLP).
QWEN_MIXED = """
- {match: "self_attn.*", layers: 0, source: ct-fp8-dynamic}
- {match: "mlp.*", layers: 0, source: ct-w8a8-smooth}
- {match: "self_attn.*", layers: 1, source: awq}
"""
QWEN_PART = {"serve": {"ct-fp8-dynamic": {}, "ct-w8a8": {}, "ct-w8a8-smooth": {}, "gptq": {}, "awq": {}},
             "unservable": [], "mixed": QWEN_MIXED, "default": "gptq", "same": []}
# GLM-4.5's MoE: experts 0-3 and the shared expert block FP8, the rest W8A8-Int8 (attention with its bias, the dense
# first layer, experts 4-7): two format groups inside each MoE layer
GLM_MIXED = """
- {match: "mlp.experts.*", experts: "0-3", source: ct-fp8-block}
- {match: "mlp.shared_experts.*", source: ct-fp8-block}
"""
# Gemma 3 (text; llm-compressor's outputs, each norm one bf16 round trip off the base's): FP8 attention, Int8
# down_proj, W4A16 gate/up. Its SmoothQuant smooths gate/up against the attention output's norm (build refuses it):
# served as it is, for the record.
GEMMA3_MIXED = """
- {match: "self_attn.*", source: ct-fp8-dynamic}
- {match: "mlp.down_proj", source: ct-w8a8}
"""
# OLMo 2 (post-norm block): FP8 attention in layer 0, W4A16 in layer 1, Int8 down_proj, GPTQ gate/up. gptqmodel's AWQ
# folds into the attention output's norm (refused by build): served as it is, for the record.
OLMO2_MIXED = """
- {match: "self_attn.*", layers: 0, source: ct-fp8-dynamic}
- {match: "self_attn.*", layers: 1, source: ct-w4a16}
- {match: "mlp.down_proj", source: ct-w8a8}
"""
# StableLM 2: SGLang builds its attention without the quantization config, so no whole source serves (as it is: a
# KeyError in SGLang's loader; built by mpconvert: the shim names the unit before loading). The base's attention
# with a GPTQ gate/up and an FP8 down_proj serves.
STABLELM_MIXED = """
- {match: "mlp.gate_proj", source: gptq}
- {match: "mlp.up_proj", source: gptq}
- {match: "mlp.down_proj", source: ct-fp8-dynamic}
"""
STABLELM_REFUSAL = "without the quantization config"
PARTS = {
    "qwen2": QWEN_PART, "qwen3": QWEN_PART,
    # "refused": sources build refuses, served as they are (how far from bf16 SGLang takes them); "expect_fail":
    # run label → what its log must say
    # "base_norms": each source S also served with the base's norms in place of its own (with_base_norms), which
    # must answer exactly as mpconvert's build of S: Gemma 3's sources hold each norm one bf16 round trip off the
    # base's, and build takes the base's
    "gemma3": {"serve": {"ct-fp8-dynamic": {}, "ct-w8a8": {}, "ct-w4a16": {}}, "unservable": [],
               "refused": ["ct-w8a8-smooth"], "mixed": GEMMA3_MIXED, "default": "ct-w4a16", "same": [],
               "base_norms": True},
    "olmo2": {"serve": {"ct-fp8-dynamic": {}, "ct-w8a8": {}, "ct-w4a16": {}, "gptq": {}}, "unservable": [],
              "refused": ["awq"], "mixed": OLMO2_MIXED, "default": "gptq", "same": []},
    "stablelm": {"serve": {}, "unservable": ["ct-fp8-dynamic", "gptq"], "mixed": STABLELM_MIXED, "default": "base",
                 "same": [], "expect_fail": {"pure-ct-fp8-dynamic": STABLELM_REFUSAL, "pure-gptq": STABLELM_REFUSAL}},
    "glm4moe": {"serve": {"ct-fp8-block": {}, "ct-w8a8": {"quantization": "w8a8_int8"}}, "unservable": [],
                "mixed": GLM_MIXED, "default": "ct-w8a8", "same": []},
    # servable sources: kind → Engine overrides for serving the source itself
    "dense": {"serve": {"ct-fp8-static": {}, "ct-fp8-block": {}, "ct-w8a8": {}, "gptq": {}, "awq": {}},
              "unservable": ["native-fp8-block"], "mixed": DENSE_MIXED, "default": "gptq",
              # native block FP8 is ct-fp8-block's bytes with the scale renamed (producers.py): once mpconvert writes
              # it in the compressed-tensors layout it must serve exactly as ct-fp8-block does
              "same": [("source-ct-fp8-block", "pure-native-fp8-block")]},
    "moe": {"serve": {"ct-fp8-block": {}, "ct-w8a8": {"quantization": "w8a8_int8"}, "gptq": {"dtype": "float16"},
                      "awq": {}},
            "unservable": [], "mixed": MOE_MIXED, "default": "gptq", "same": []},
    # GPTQ is served inside the mixed model only: a whole-GPTQ DeepSeek puts packed int4 in the MLA projections, which
    # SGLang's loader decodes only for AWQ (rules.mla_problems; build refuses it)
    "deepseek": {"serve": {"ct-fp8-block": {}, "ct-w8a8": {"quantization": "w8a8_int8"}},
                 "unservable": [], "mixed": DEEPSEEK_MIXED, "default": "gptq", "same": [], "mixed_dtype": "float16"},
    # "more": further builds, label → (rules, default), served beside the mixed one; "fused": run label → MoE layers
    # SGLang must have fused shared experts into (gpu/measure_plugin.py reports them)
    "deepseek_v3": {"serve": {"ct-fp8-block": {}, "ct-w8a8": {"quantization": "w8a8_int8"}}, "unservable": [],
                    "mixed": DEEPSEEK_V3_MIXED, "default": "ct-w8a8", "same": [],
                    "mixed_tp": 1,  # (its experts' intermediate size is one FP8 block: no TP split of them)
                    "more": {"shared-apart": (SHARED_APART, "ct-fp8-block")},
                    "fused": {**{f"{w}-{k}": 1 for w in ("source", "pure") for k in ("ct-fp8-block", "ct-w8a8")},
                              "mixed": 0, "shared-apart": 0}},
}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ---- build -------------------------------------------------------------------------------------------------------
def build(name: str, base: Path, sources: dict[str, Path], default: str, rules: str = "", tp: int = 1) -> Path:
    from mpconvert.plan import make_plan
    from mpconvert.recipe import load_recipe
    from mpconvert.rules import Parallel
    from mpconvert.writer import write

    d = WORK / "recipes" / name
    d.mkdir(parents=True, exist_ok=True)
    text = f"base: {base}\nsources:\n" + "".join(f"  {k}: {v}\n" for k, v in sources.items()) + f"default: {default}\n"
    if rules.strip():
        text += "rules:\n" + "".join(f"  {line}\n" for line in rules.strip().splitlines())
    (d / "recipe.yaml").write_text(text)
    out = WORK / "built" / name
    t = time.time()
    write(make_plan(load_recipe(d / "recipe.yaml"), Parallel(tp)), out, 5 << 30, force=True)
    log(f"built {name} in {time.time() - t:.1f}s")
    return out


# ---- engines -----------------------------------------------------------------------------------------------------
def engine(label: str, spec: dict, timeout: int = int(os.environ.get("E2E_CHILD_TIMEOUT", "420"))) -> dict:
    timeout = spec.get("timeout", timeout)
    logf = WORK / "logs" / f"{label}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get("E2E_DRY"):  # check builds and reporting on a machine without a GPU
        return {"ok": False, "error": "dry run"}
    left = BUDGET_S - (time.time() - T0)
    if left < 60:
        return {"ok": False, "error": "skipped: out of time budget"}
    t = time.time()
    with open(logf, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(HERE / "engine_child.py"), json.dumps(spec)], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=min(timeout, left))
        except subprocess.TimeoutExpired:  # a hung Engine: its scheduler workers too, or they hold the GPUs
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = logf.read_text(errors="replace")
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    r = json.loads(lines[-1][7:]) if lines else {"ok": False, "error": "timeout or crash: " + text[-600:]}
    m = re.findall(r"Load weight end.*?mem usage=(-?[0-9.]+) GB", text)
    if m:
        r["weight_gb_log"] = float(m[-1])
    exact = []  # one JSON object per rank; two ranks' prints can share a line
    for m in re.finditer(r"E2E_WEIGHT_BYTES (\{)", text):
        try:
            exact.append(json.JSONDecoder().raw_decode(text, m.start(1))[0])
        except ValueError:
            pass
    if exact:  # gpu/measure_plugin.py: bytes the model's parameters and buffers hold, per TP rank
        r["weight_bytes"] = exact
    fused = re.findall(r"E2E_FUSED_SHARED (\{.*\})", text)
    if fused:  # gpu/measure_plugin.py: the MoE layers SGLang fused shared experts into, per TP rank
        r["fused_shared"] = [json.loads(f)["fused"] for f in fused]
    bench = re.search(r"E2E_MOE_BENCH (\{.*\})", text)
    if bench:  # gpu/measure_plugin.py: one MoE block timed alone in a CUDA graph
        r["moe_bench"] = json.loads(bench.group(1))
    r["wall_s"] = round(time.time() - t, 1)
    log(f"{'OK  ' if r.get('ok') else 'FAIL'} {label} ({r['wall_s']}s){'' if r.get('ok') else ': ' + r['error'][-300:]}")
    return r


def longer_context(path: Path) -> tuple[str, str]:
    """--json-model-override-args doubling the directory's max_position_embeddings."""
    longer = 2 * json.loads((path / "config.json").read_text())["max_position_embeddings"]
    return "--json-model-override-args", json.dumps({"max_position_embeddings": longer})


def served(label: str, path: Path, port: int = 30555, timeout: int = 300, dtype: str = "auto",
           extra: tuple[str, ...] = ()) -> dict:
    """`mpconvert serve DIR -- ARGS` (i.e. `python -m sglang.launch_server --model-path DIR`, no mpconvert flag): wait
    for /health, send the fixed prompts to /generate, shut it down. Same fields as an Engine run, to compare. `extra`:
    more launch_server arguments (speculative decoding's)."""
    import urllib.request

    sys.path.insert(0, str(HERE))
    from engine_child import pack_outputs, prompts

    logf = WORK / "logs" / f"{label}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get("E2E_DRY") or BUDGET_S - (time.time() - T0) < 60:
        return {"ok": False, "error": "dry run or out of time budget"}
    args = ["--host", "127.0.0.1", "--port", str(port), "--attention-backend", "triton", "--sampling-backend",
            "pytorch", "--grammar-backend", "none", "--skip-tokenizer-init", "--disable-cuda-graph",
            "--mem-fraction-static", "0.1", "--max-total-tokens", "2048", "--log-level", "info", "--dtype", dtype,
            *extra]
    cmd = [sys.executable, "-m", "mpconvert.cli.main", "serve", str(path), "--", *args]
    t = time.time()
    r: dict = {"ok": False, "command": cmd}
    with open(logf, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            while time.time() - t < timeout and proc.poll() is None:
                try:
                    if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
                        break
                except OSError:
                    time.sleep(2)
            else:
                raise RuntimeError(f"server not up (exit {proc.poll()}): " + logf.read_text(errors="replace")[-600:])
            r["load_s"] = round(time.time() - t, 1)
            body = {"input_ids": prompts(int(os.environ.get("E2E_PROMPTS", "4"))), "return_logprob": True,
                    "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
                    "top_logprobs_num": 5, "logprob_start_len": 0}
            req = urllib.request.Request(url + "/generate", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            r["outputs"] = pack_outputs(json.loads(urllib.request.urlopen(req, timeout=120).read()))
            r["ok"] = True
        except Exception as e:  # recorded, not raised: the report says what failed
            r["error"] = repr(e)[-800:]
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except ProcessLookupError:
                pass  # the server already exited (its log says why)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    r["wall_s"] = round(time.time() - t, 1)
    log(f"{'OK  ' if r['ok'] else 'FAIL'} {label} ({r['wall_s']}s){'' if r['ok'] else ': ' + r['error'][-300:]}")
    return r


def run_all(jobs: dict[str, dict], par: int) -> dict[str, dict]:
    if not jobs:
        return {}
    # one NCCL port per Engine, by label: Engines started together otherwise race for the same free port
    jobs = {k: {"nccl_port": 20000 + 10 * (zlib.crc32(k.encode()) % 2000), **v} for k, v in jobs.items()}
    with ThreadPoolExecutor(par) as ex:
        futs = {k: ex.submit(engine, k, spec) for k, spec in jobs.items()}
        res = {k: f.result() for k, f in futs.items()}
    # a concurrent start can lose SGLang's memory-profiling race, or a port another Engine's process took meanwhile
    # (gemma3, session 33: EADDRINUSE on the label's own NCCL port): retry those alone
    for k, r in res.items():
        if not r.get("ok") and any(w in r.get("error", "").lower() for w in ("memory", "address already in use")):
            res[k] = engine(k + "-retry", jobs[k])
    return res


# ---- comparisons -------------------------------------------------------------------------------------------------
def tp1_run(label: str) -> str | None:
    """The TP=1 run a TP=2 or EP=2 run is compared with (`mixed-experts-ep2` → `mixed-experts`); None for a TP=1 run."""
    return label[:-4] if label.endswith(("-tp2", "-ep2")) else None


def identical(a: dict, b: dict) -> dict:
    if not (a.get("ok") and b.get("ok")):
        return {"identical": None, "why": "a run failed"}
    ids = all(x["ids"] == y["ids"] for x, y in zip(a["outputs"], b["outputs"]))
    d = 0.0
    same_top = True
    for x, y in zip(a["outputs"], b["outputs"]):
        for sx, sy in zip(x["top"], y["top"]):
            same_top &= [t for _, t in sx] == [t for _, t in sy]
            d = max(d, max(abs(p - q) for (p, _), (q, _) in zip(sx, sy)))
    return {"identical": ids and same_top and d == 0.0, "same_tokens": ids, "same_top5_ids": same_top,
            "max_top5_logprob_diff": d}


def vs_bf16(r: dict, ref: dict) -> dict:
    """Teacher-forced on the same prompts: |Δ logprob| of each prompt token and argmax agreement, vs bf16."""
    if not (r.get("ok") and ref.get("ok")):
        return {}
    diffs, agree, n = [], 0, 0
    for x, y in zip(r["outputs"], ref["outputs"]):
        diffs += [abs(p - q) for p, q in zip(x["input_lp"], y["input_lp"]) if p is not None and q is not None]
        for a, b in zip(x["input_top1"], y["input_top1"]):
            if a is not None and b is not None:
                agree += a == b
                n += 1
    return {"mean_abs_dlogprob": round(sum(diffs) / len(diffs), 5), "max_abs_dlogprob": round(max(diffs), 5),
            "top1_agreement": round(agree / n, 4)}


# ---- parts -------------------------------------------------------------------------------------------------------
def build_mixed(part: str, fx: dict[str, Path]) -> Path:
    """The part's mixed recipe, over the sources its rules and default name; checked for TP=2 (or mixed_tp)."""
    P = PARTS[part]
    return build(f"{part}-mixed", fx["base"], sources_of(P["mixed"], P["default"], fx), P["default"], P["mixed"],
                 tp=P.get("mixed_tp", 2))


def sources_of(rules: str, default: str, fx: dict[str, Path]) -> dict[str, Path]:
    """The fixtures a recipe's rules and default name (base: the recipe's base, not a source)."""
    used = ({rule["source"] for rule in yaml.safe_load(rules)} | {default}) - {"base"}
    return {k: fx[k] for k in sorted(used)}


def fidelity(part: str, meta: dict, res: dict) -> None:
    P = PARTS[part]
    fx = {k: WORK / "fixtures" / k for k in meta["kinds"]}
    base = fx["base"]
    kinds = list(P["serve"]) + P["unservable"]
    built = {f"pure-{k}": build(f"{part}-pure-{k}", base, {k: fx[k]}, k) for k in kinds}
    built["mixed"] = build_mixed(part, fx)
    jobs = {"bf16": {"path": str(base)}}
    for k, over in P["serve"].items():
        jobs[f"source-{k}"] = {"path": str(fx[k]), **over}
        jobs[f"pure-{k}"] = {"path": str(built[f"pure-{k}"]), **({"dtype": over["dtype"]} if "dtype" in over else {})}
    for k in P["unservable"]:
        jobs[f"source-{k}"] = {"path": str(fx[k])}  # served as it is: the trap, for the record
        jobs[f"pure-{k}"] = {"path": str(built[f"pure-{k}"])}
    for k in P.get("refused", []):
        jobs[f"source-{k}"] = {"path": str(fx[k])}
    same = list(P["same"])
    if P.get("base_norms"):
        for k in P["serve"]:
            jobs[f"base-norms-{k}"] = {"path": str(with_base_norms(fx[k], base, built[f"pure-{k}"])), **P["serve"][k]}
            same.append((f"base-norms-{k}", f"pure-{k}"))
    jobs["mixed"] = {"path": str(built["mixed"]), **({"dtype": P["mixed_dtype"]} if "mixed_dtype" in P else {})}
    for label, (rules, default) in P.get("more", {}).items():
        jobs[label] = {"path": str(build(f"{part}-{label}", base, sources_of(rules, default, fx), default, rules))}
    only = os.environ.get("E2E_ONLY")  # e.g. "source-gptq,pure-gptq,bf16": rerun just those
    if only:
        jobs = {k: v for k, v in jobs.items() if k in only.split(",")}
    gpus = max(1, torch_gpus())
    for i, spec in enumerate(jobs.values()):
        spec["gpu"] = i % gpus
    runs = run_all(jobs, par=int(os.environ.get("E2E_PAR", "8")))
    if "mixed" in jobs:
        # the server path (launch_server through `mpconvert serve`) must answer exactly as the Engine did; and a
        # config value the weights leave open, set at launch (serve checks it against the weights, SGLang applies
        # it): a longer max_position_embeddings changes no answer to these short prompts. Both servers at once.
        dtype = P.get("mixed_dtype", "auto")
        with ThreadPoolExecutor(2) as ex:
            plain = ex.submit(served, "mixed-server", built["mixed"], dtype=dtype)
            longer = ex.submit(served, "mixed-server-override", built["mixed"], port=30565, dtype=dtype,
                               extra=longer_context(built["mixed"]))
            runs["mixed-server"], runs["mixed-server-override"] = plain.result(), longer.result()
        runs["mixed-tp2"] = (engine("mixed-tp2", {**jobs["mixed"], "tp": 2}) if gpus > 1 else
                             {"ok": False, "error": f"not run: TP=2 needs 2 GPUs, this machine has {gpus}"})
    res["runs"] = runs
    missing = {"ok": False, "error": "not run"}
    get = lambda k: runs.get(k, missing)  # noqa: E731
    res["identity"] = {k: identical(get(f"source-{k}"), get(f"pure-{k}")) for k in P["serve"]}
    res["vs_bf16"] = {k: vs_bf16(r, get("bf16")) for k, r in runs.items() if k != "bf16"}
    res["identity"].update({f"{a} = {b}": identical(get(a), get(b)) for a, b in same})
    res["identity"]["mixed: launch_server = Engine"] = identical(get("mixed"), get("mixed-server"))
    if "mixed-server-override" in runs:
        res["identity"]["mixed: launch_server with max_position_embeddings x2 at launch = Engine"] = \
            identical(get("mixed"), get("mixed-server-override"))
    res["tp2_vs_tp1"] = tp_compare(get("mixed"), get("mixed-tp2"))
    res["mixed_formats"] = sorted({u.format for u in load_manifest(built["mixed"])[0].units.values()})
    res["expected_failures"] = {label: expected_failure(label, get(label), why)
                                for label, why in P.get("expect_fail", {}).items()}
    res["fusion"] = {label: fusion_verdict(get(label), want) for label, want in P.get("fused", {}).items()}


def fusion_verdict(r: dict, want: int) -> str:
    """Whether SGLang fused shared experts into every MoE layer (want: how many per layer) or into none (want 0)."""
    if "fused_shared" not in r:
        return f"not known: {r.get('error', 'no E2E_FUSED_SHARED line')}"[:300]
    got = r["fused_shared"][0]
    ok = set(got.values()) == {want} if want else not got
    return f"{'as expected' if ok else 'WRONG'}: " + (f"fused into {sorted(got.items())}" if got else "not fused")


def with_base_norms(src: Path, base: Path, built: Path) -> Path:
    """A copy of source checkpoint `src` with every norm that mpconvert's build of it took from the base (its
    manifest says which) replaced by the base's tensor: what that build should serve exactly as."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest = load_manifest(built)[0]
    names = {t for m in manifest.modules.values() if m.kind == "norm" and m.source == "base"
             for t in m.tensor_names.values()}
    out = WORK / "base-norms" / src.name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    with safe_open(src / "model.safetensors", "pt") as f, safe_open(base / "model.safetensors", "pt") as b:
        meta = f.metadata()
        tensors = {k: (b if k in names else f).get_tensor(k) for k in f.keys()}
    save_file(tensors, out / "model.safetensors", metadata=meta)
    log(f"{out.name}: {len(names & tensors.keys())} norms from the base")
    return out


def expected_failure(label: str, r: dict, why: str) -> str:
    """A run that must fail, and fail saying `why` (in its log: the scheduler's error reaches the Engine only as
    "scheduler died")."""
    if r.get("ok"):
        return "WRONG: it served"
    logf = WORK / "logs" / f"{label}.log"
    text = " ".join(logf.read_text(errors="replace").split()) if logf.exists() else ""
    return f"as expected: {why!r} in its log" if why in text else f"WRONG: failed without {why!r}"


EXPERTS_MIXED = """
- {match: "mlp.experts.*", layers: 0, experts: "0-3", source: ct-fp8-block}
- {match: "mlp.experts.*", layers: 1, experts: "2-3", source: base}
- {match: "mlp.experts.*", layers: 1, experts: "4-7", source: ct-fp8-block}
"""  # default ct-w8a8: layer 0 experts 4-7, layer 1 experts 0-1, all attention (bf16 model: no GPTQ group)
EXPERTS_GPTQ_MIXED = """
- {match: "mlp.experts.*", layers: 0, experts: "0-3", source: ct-fp8-block}
- {match: "mlp.experts.*", layers: 1, experts: "0-1", source: ct-w8a8}
- {match: "mlp.experts.*", layers: 1, experts: "6-7", source: ct-fp8-block}
- {match: "self_attn.*", source: ct-w8a8}
"""  # default gptq: layer 0 experts 4-7, layer 1 experts 2-5 (the model runs in fp16: GPTQ MoE on Marlin needs it)


# DeepSeek-V3 with one MTP layer (layer 2: fixtures/mtp.py) at the real MLA sizes. FP8-block MLA attention but a bf16
# kv_b_proj (the model runs fp16 for its GPTQ experts: rules.dtype_problems), the dense MLP and the shared experts FP8,
# the routed experts GPTQ but 0-3 FP8 — in the MTP layer too, which the NextN draft model serves.
MTP_MIXED = """
- {match: "self_attn.kv_b_proj", source: base}
- {match: "self_attn.*", source: ct-fp8-block}
- {match: "mlp.*", layers: 0, source: ct-fp8-block}
- {match: "mlp.shared_experts.*", source: ct-fp8-block}
- {match: "mlp.experts.*", experts: "0-3", source: ct-fp8-block}
"""
# SGLang's DeepSeek MTP: the draft is the same directory's MTP layer (DeepseekV3ForCausalLMNextN), two draft steps
NEXTN = {"speculative_algorithm": "NEXTN", "speculative_num_steps": 2, "speculative_eagle_topk": 1,
         "speculative_num_draft_tokens": 3}
NEXTN_ARGS = tuple(a for k, v in NEXTN.items() for a in (f"--{k.replace('_', '-')}", str(v)))


def spec_compare(plain: dict, spec: dict) -> dict:
    """Greedy tokens with speculative decoding against the same model without it (the target model verifies every
    drafted token, so they agree up to the arithmetic of verifying several tokens at once), and the tokens each
    verify step gave (the draft's acceptance: 1 when no drafted token is ever taken)."""
    if not (plain.get("ok") and spec.get("ok")):
        return {"same_tokens": None, "why": "a run failed"}
    pairs = list(zip(plain["outputs"], spec["outputs"]))
    first = [next((i for i, (p, q) in enumerate(zip(x["ids"], y["ids"])) if p != q), None) for x, y in pairs]
    steps = [y.get("spec_verify_ct") for _, y in pairs]
    tokens = sum(len(y["ids"]) for _, y in pairs)
    return {"same_tokens": all(f is None for f in first), "first_difference": first,
            "tokens_per_verify_step": round(tokens / sum(steps), 3) if all(steps) else None}


def mtp(meta: dict, res: dict) -> None:
    """Speculative decoding (NEXTN) of mpconvert builds of a DeepSeek-V3 with its MTP layer: the bf16 base, the mixed
    build (fp16) and the pure FP8-block build (bf16), each with and without it (greedy tokens agree up to near-ties:
    spec_compare); every run's teacher-forced logprobs against the bf16 base's; the FP8-block source
    itself with it (its pure build must answer identically); and the mixed build with it through launch_server
    (`mpconvert serve`), which must answer as its Engine does."""
    fx = {k: WORK / "fixtures" / k for k in meta["kinds"]}
    base, fp8 = fx["base"], fx["ct-fp8-block"]
    built = {"mixed": build("mtp-mixed", base, {"ct-fp8-block": fp8, "gptq": fx["gptq"]}, "gptq", MTP_MIXED),
             "pure-fp8": build("mtp-pure-fp8", base, {"ct-fp8-block": fp8}, "ct-fp8-block")}
    m = load_manifest(built["mixed"])[0]
    res["mixed_formats"] = sorted({u.format for u in m.units.values()})
    res["mtp_layer_units"] = {n: u.format for n, u in m.units.items() if n.startswith("model.layers.2.")}
    mixed = {"path": str(built["mixed"]), "dtype": "float16"}
    pure = {"path": str(built["pure-fp8"])}
    jobs = {"bf16": {"path": str(base)}, "bf16-nextn": {"path": str(base), "speculative": NEXTN},
            "mixed": mixed, "mixed-nextn": {**mixed, "speculative": NEXTN}, "pure-fp8": pure,
            "pure-fp8-nextn": {**pure, "speculative": NEXTN}, "source-fp8-nextn": {"path": str(fp8), "speculative": NEXTN}}
    runs = run_all(jobs, par=int(os.environ.get("E2E_PAR", "8")))
    runs["mixed-nextn-server"] = served("mixed-nextn-server", built["mixed"], dtype="float16", extra=NEXTN_ARGS)
    res["runs"] = runs
    missing = {"ok": False, "error": "not run"}
    get = lambda k: runs.get(k, missing)  # noqa: E731
    res["vs_bf16"] = {k: vs_bf16(r, get("bf16")) for k, r in runs.items() if k != "bf16"}
    res["spec_vs_plain"] = {k: spec_compare(get(k), get(f"{k}-nextn")) for k in ("bf16", "mixed", "pure-fp8")}
    res["identity"] = {"ct-fp8-block source = pure build, both NEXTN": identical(get("source-fp8-nextn"),
                                                                                 get("pure-fp8-nextn")),
                       "mixed NEXTN: launch_server = Engine": identical(get("mixed-nextn"), get("mixed-nextn-server"))}
    res["tp2_vs_tp1"] = "not run (one GPU)"


def split_groups(d: Path) -> None:
    """Rewrite a built directory's single-format MoE layers as two expert groups of that same format (the lower and
    upper half of the experts), and re-sign the manifest: the mixed-experts path with nothing mixed, to compare with
    the plain path."""
    from mpconvert.manifest import MANIFEST, ExpertGroup, UnitEntry, quantization_config

    m, _ = load_manifest(d)
    units = dict(m.units)
    for unit, spec in m.units.items():
        if unit.endswith(".experts"):
            half = m.model.num_experts // 2
            units[unit] = UnitEntry(format="mixed_experts", params={}, members=spec.members, groups=[
                ExpertGroup(format=spec.format, params=spec.params, experts=list(range(half))),
                ExpertGroup(format=spec.format, params=spec.params, experts=list(range(half, 2 * half)))])
    m = msgspec.structs.replace(m, units=units)
    raw = m.dumps()
    (d / MANIFEST).write_bytes(raw)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(raw, m.formats())  # as mpconvert's writer signs it
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def split_copy(d: Path, name: str) -> Path:
    """A copy of built directory d (tensor files hard-linked, never written) whose MoE layers are split in two
    same-format groups (split_groups)."""
    out = WORK / "built" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in d.iterdir():
        (os.link if f.suffix == ".safetensors" else shutil.copy)(f, out / f.name)
    split_groups(out)
    return out


def dequantized(d: Path, base: Path) -> Path:
    """The dequantized reference of a built directory: every linear replaced by its format's reference dequantization
    (mpconvert.fidelity), as a plain checkpoint SGLang serves without any quantization."""
    from safetensors.torch import save_file

    from mpconvert.checkpoint import Checkpoint
    from mpconvert.fidelity import _dequantized_state

    out = WORK / "built" / (d.name + "-dequantized")
    out.mkdir(parents=True, exist_ok=True)
    state, _ = _dequantized_state(d, load_manifest(d)[0], Checkpoint.open(d, "out").tensors, base)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def per_layer(dumps: dict[str, Path], ref: Path, tie: float = 1e-2) -> dict[str, dict]:
    """Each MoE block SGLang ran (inputs and outputs recorded by gpu/measure_plugin.py on the prompts' prefill) against
    the same block of the reference checkpoint in transformers (float32, the model's own routing: softmax, top-k,
    renormalization), fed the very inputs SGLang's block saw: ‖out − ref‖ / ‖ref‖ and cosine per layer. A token whose
    k-th and (k+1)-th router logits lie within `tie` of each other may pick another expert in SGLang's half-precision
    router than in the float32 reference, which is not an error of the experts: the error is also given without those
    tokens (`near_ties` counts them), with the worst token's. `dumps`: run → its dump directory, every run served
    a checkpoint whose reference is `ref` (loaded once for them all)."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).to(dev).eval()
    return {run: _blocks_vs_reference(d, model, dev, tie) for run, d in dumps.items()}


def _blocks_vs_reference(dumps: Path, model, dev: str, tie: float) -> dict:
    import torch

    files = sorted(dumps.glob("rank0.*.pt"))
    if not files:
        return {"error": f"no MoE block dumps in {dumps}"}
    k = model.config.num_experts_per_tok
    out = {}
    for f in files:
        name = f.name[len("rank0."):-len(".pt")]
        block = model.get_submodule(name)
        got, want, near = [], [], []
        for call in torch.load(f):
            x = call["input"].to(dev)
            with torch.no_grad():
                r = block(x[None])
                top = torch.nn.functional.linear(x, block.gate.weight).topk(k + 1, dim=-1).values
            want.append((r[0] if isinstance(r, tuple) else r).reshape(call["output"].shape))
            got.append(call["output"].to(dev))
            near.append(top[:, k - 1] - top[:, k] < tie)
        o, r, near = torch.cat(got), torch.cat(want), torch.cat(near)
        per_token = (o - r).norm(dim=-1) / r.norm(dim=-1)
        keep = ~near
        out[name] = {"rel_error": round(float((o - r).norm() / r.norm()), 5), "tokens": o.shape[0],
                     "cosine": round(float(torch.nn.functional.cosine_similarity(o.flatten(), r.flatten(), 0)), 6),
                     "near_ties": int(near.sum()),
                     "rel_error_without_near_ties": round(float((o[keep] - r[keep]).norm() / r[keep].norm()), 5),
                     "worst_token": round(float(per_token.max()), 4),
                     "worst_token_near_tie": bool(near[per_token.argmax()])}
    return out


def experts(meta: dict, res: dict) -> None:
    """Issue 5 on the GPU, with real quantizer outputs of the tiny Qwen3-MoE:
    (a) one format split in two expert groups (the mixed-experts path, nothing mixed) vs the plain layer — FP8
        (Triton) and GPTQ (Marlin, fp16);
    (b) mixed models serve: FP8/Int8/bf16 experts, and FP8/Int8/GPTQ experts (fp16); whole-model vs bf16 and vs the
        dequantized reference, and per MoE layer vs the reference block in transformers (beside each single format's
        own per-layer error: the band);
    (c) TP=2 and EP=2 vs TP=1 (bf16 beside them: what TP/EP alone change);
    and issue 6's MoE GPTQ pair (the source served as it is vs the checkpoint built from it, fp16)."""
    fx = {k: WORK / "fixtures" / k for k in meta["kinds"]}
    base = fx["base"]
    fp8 = build("experts-pure-fp8", base, {"ct-fp8-block": fx["ct-fp8-block"]}, "ct-fp8-block")
    int8 = build("experts-pure-int8", base, {"ct-w8a8": fx["ct-w8a8"]}, "ct-w8a8")
    gptq = build("experts-pure-gptq", base, {"gptq": fx["gptq"]}, "gptq")
    mixed = build("experts-mixed", base, {k: fx[k] for k in ("ct-fp8-block", "ct-w8a8")}, "ct-w8a8",
                  EXPERTS_MIXED, tp=2)
    mixed_gptq = build("experts-mixed-gptq", base, {k: fx[k] for k in ("ct-fp8-block", "ct-w8a8", "gptq")}, "gptq",
                       EXPERTS_GPTQ_MIXED, tp=2)
    refs = {k: dequantized(d, base) for k, d in (("pure-fp8", fp8), ("pure-int8", int8), ("pure-gptq", gptq),
                                                  ("mixed-experts", mixed), ("mixed-gptq", mixed_gptq))}
    refs["bf16"] = base
    refs["source-gptq"] = refs["pure-gptq"]  # the same bytes
    fp16 = {"dtype": "float16"}
    dump = lambda k: {"dump": str(WORK / "dumps" / k)}  # noqa: E731
    jobs = {"bf16": {"path": str(base), **dump("bf16")},
            "pure-fp8": {"path": str(fp8), **dump("pure-fp8")},
            "pure-int8": {"path": str(int8), **dump("pure-int8")},
            "split-fp8": {"path": str(split_copy(fp8, "experts-split-fp8"))},
            "mixed-experts": {"path": str(mixed), **dump("mixed-experts")},
            "dequantized-ref": {"path": str(refs["mixed-experts"])},
            "source-gptq": {"path": str(fx["gptq"]), **fp16},
            "pure-gptq": {"path": str(gptq), **fp16, **dump("pure-gptq")},
            "split-gptq": {"path": str(split_copy(gptq, "experts-split-gptq")), **fp16},
            "mixed-gptq": {"path": str(mixed_gptq), **fp16, **dump("mixed-gptq")},
            # decode in CUDA graphs
            "pure-fp8-graphs": {"path": str(fp8), "cuda_graph": True},
            "split-fp8-graphs": {"path": str(split_copy(fp8, "experts-split-fp8-g")), "cuda_graph": True},
            "mixed-experts-graphs": {"path": str(mixed), "cuda_graph": True}}
    gpus = max(1, torch_gpus())
    only = os.environ.get("E2E_ONLY", "").split(",") if os.environ.get("E2E_ONLY") else None  # rerun just those
    pick = lambda d: {k: v for k, v in d.items() if only is None or k in only}  # noqa: E731
    jobs = {k: {**SMALL, **v, "gpu": i % gpus} for i, (k, v) in enumerate(pick(jobs).items())}
    runs = run_all(jobs, par=len(jobs))
    if gpus > 1:  # TP=2 and EP=2 Engines side by side, each over both GPUs (MoE blocks dumped on rank 0 after the
        # all-reduce: the whole layer's output, comparable with the same reference as at TP=1)
        multi = {"bf16-tp2": {"path": str(base), "tp": 2, **dump("bf16-tp2")},
                 "mixed-experts-tp2": {"path": str(mixed), "tp": 2, **dump("mixed-experts-tp2")},
                 "bf16-ep2": {"path": str(base), "tp": 2, "ep": 2},
                 "mixed-experts-ep2": {"path": str(mixed), "tp": 2, "ep": 2, **dump("mixed-experts-ep2")},
                 "mixed-gptq-tp2": {"path": str(mixed_gptq), "tp": 2, **fp16, **dump("mixed-gptq-tp2")},
                 # GPTQ MoE at TP=2: SGLang serving the source itself (its 0.5.17 bugs, sglang_fixes.py) and the
                 # checkpoint built from it through the shim (corrected)
                 "source-gptq-tp2": {"path": str(fx["gptq"]), "tp": 2, **fp16, **dump("source-gptq-tp2")},
                 "pure-gptq-tp2": {"path": str(gptq), "tp": 2, **fp16, **dump("pure-gptq-tp2")},
                 # SGLang's own default (FlashInfer all-reduce fusion on), stacks dumped: what the Engine waits for
                 "bf16-tp2-fusion": {"path": str(base), "tp": 2, "ar_fusion": True, "stacks": 75, "timeout": 150}}
        runs.update(run_all({k: {**SMALL, "stacks": 150, **v} for k, v in pick(multi).items()}, par=len(multi)))
    res["runs"] = runs
    get = lambda k: runs.get(k, {"ok": False})  # noqa: E731
    res["identity"] = {"split-fp8 (FP8 in 2 groups, Triton) vs pure-fp8": identical(get("pure-fp8"), get("split-fp8")),
                       "split-gptq (GPTQ in 2 groups, Marlin) vs pure-gptq": identical(get("pure-gptq"),
                                                                                     get("split-gptq")),
                       "gptq MoE: source served as it is vs pure-gptq build": identical(get("source-gptq"),
                                                                                        get("pure-gptq")),
                       "split-gptq (the shim's Marlin groups) vs the GPTQ source served natively":
                           identical(get("source-gptq"), get("split-gptq")),
                       "split-fp8 vs pure-fp8, decode in CUDA graphs":
                           identical(get("pure-fp8-graphs"), get("split-fp8-graphs")),
                       "mixed-experts: decode in CUDA graphs vs eager": identical(get("mixed-experts"),
                                                                                  get("mixed-experts-graphs"))}
    res["vs_bf16"] = {k: vs_bf16(r, get("bf16")) for k, r in runs.items() if k != "bf16" and "outputs" in r}
    res["vs_dequantized_ref"] = {k: vs_bf16(get(k), get("dequantized-ref")) for k in ("mixed-experts", "bf16")}
    # every run whose MoE blocks were dumped, against the reference of the checkpoint it served (TP/EP runs: the same)
    dumped = [k for k in runs if (WORK / "dumps" / k).is_dir()]
    by_ref: dict[Path, dict[str, Path]] = {}
    for k in dumped:
        if get(k).get("ok"):
            by_ref.setdefault(refs[tp1_run(k) or k], {})[k] = WORK / "dumps" / k
    compared = {run: r for ref, ds in by_ref.items() for run, r in per_layer(ds, ref).items()}
    res["per_layer"] = {k: compared.get(k, {"error": "run failed"}) for k in dumped}
    if gpus > 1:
        res["tp2_vs_tp1"] = {k: tp_compare(get(tp1_run(k)), get(k)) for k in runs if tp1_run(k)}
    res["n_layers"] = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    res["mixed_units"] = {name: {u: [as_json(g) for g in s.groups] if s.groups else None
                                 for u, s in load_manifest(d)[0].units.items() if u.endswith(".experts")}
                          for name, d in (("mixed-experts", mixed), ("mixed-gptq", mixed_gptq))}


def experts_speed(meta: dict, res: dict) -> None:
    """Decode speed of expert-level mixed precision on a Qwen3-30B-A3B-shaped model (8 of its layers: 128 experts of
    768, top-8; random weights in the real FP8-block and Int8 layouts, gpu/synth.py), one Engine per GPU at a time:
    pure FP8, pure Int8, FP8 split in two groups of 64 (what the extra group calls cost, nothing else changed), and the
    mixed model: each layer's 16 most routed experts (a routing-count file) in FP8, the other 112 and attention in
    Int8. Target: mixed ≥ 0.97 × the byte-weighted blend of the pure models."""
    import random

    sys.path.insert(0, str(HERE))
    import synth

    t = time.time()
    base = WORK / "fixtures" / ("moe" if meta["part"] == "tp" else "") / "base"  # its tokenizer and config
    cfg = synth.moe_config(json.loads((base / "config.json").read_text()))
    dirs = synth.main(WORK / "synth-moe", meta["templates"], base, cfg)
    log(f"synthesized {len(dirs)} MoE checkpoints in {time.time() - t:.0f}s")
    fp8 = build("speed-pure-fp8", dirs["base"], {"ct-fp8-block": dirs["ct-fp8-block"]}, "ct-fp8-block")
    int8 = build("speed-pure-int8", dirs["base"], {"ct-w8a8": dirs["ct-w8a8"]}, "ct-w8a8")
    split = split_copy(fp8, "speed-split-fp8")
    rng = random.Random(0)  # skewed, as real routing is: a few experts take most tokens
    routing = WORK / "recipes" / "routing.json"
    routing.parent.mkdir(parents=True, exist_ok=True)
    experts = range(cfg["num_local_experts"])
    routing.write_text(json.dumps({str(layer): [int(100 * rng.paretovariate(1.1)) for _ in experts]
                                   for layer in range(cfg["num_hidden_layers"])}))
    mixed = build("speed-mixed", dirs["base"], {k: dirs[k] for k in ("ct-fp8-block", "ct-w8a8")}, "ct-w8a8",
                  f'- {{match: "mlp.experts.*", experts: {{file: "{routing}", top: 16}}, source: ct-fp8-block}}')
    spec = {"mode": "speed", "cuda_graph": True, "mem_fraction": 0.5, "max_total_tokens": 16384, "log_level": "info",
            "batch_sizes": [1, 8, 32]}
    queues = [[("pure-fp8", fp8), ("split-fp8", split)], [("pure-int8", int8), ("mixed-experts", mixed)]]
    if torch_gpus() < 2:
        queues = [queues[0] + queues[1]]
    res["moe_speed_runs"] = run_queues(queues, spec)
    totals = load_manifest(mixed)[0].totals
    res["moe_speed_fp8_share"] = (totals.by_format["fp8"].bytes if "fp8" in totals.by_format else 0) / \
        totals.linear_bytes
    res["moe_speed_model"] = {k: cfg[k] for k in synth.MOE_SHAPE}


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def tp_identity(meta: dict, res: dict) -> None:
    """Issue 6 item 4 on taught models (producers.teach: trained to continue any prompt along a fixed successor chain,
    so their greedy choices are confident, as a served model's are — a random model's top two logits often differ by
    less than a TP split's rounding): the dense mixed recipe (FP8, Int8, AWQ, GPTQ layers) and the mixed-experts
    recipe (FP8, Int8 and bf16 experts in one layer), and each bf16 model as the baseline, at TP=1, then TP=2 and, for
    the MoE models, EP=2, all on the same prompts."""
    sys.path.insert(0, str(HERE))
    from engine_child import prompts
    from fixtures.producers import successor

    ll = {k: WORK / "fixtures" / "llama" / k for k in meta["sets"]["llama"]}
    mo = {k: WORK / "fixtures" / "moe" / k for k in meta["sets"]["moe"]}
    models = {"dense-bf16": ll["base"], "dense-mixed": build_mixed("dense", ll), "moe-bf16": mo["base"],
              "experts-mixed": build("tp-experts-mixed", mo["base"], {k: mo[k] for k in ("ct-fp8-block", "ct-w8a8")},
                                     "ct-w8a8", EXPERTS_MIXED, tp=2)}
    gpus = max(1, torch_gpus())
    runs = run_all({k: {**SMALL, "path": str(p), "gpu": i % gpus} for i, (k, p) in enumerate(models.items())},
                   par=len(models))
    if gpus > 1:
        multi = {f"{k}-tp2": {**SMALL, "path": str(p), "tp": 2} for k, p in models.items()}
        multi.update({f"{k}-ep2": {**SMALL, "path": str(models[k]), "tp": 2, "ep": 2}
                      for k in ("moe-bf16", "experts-mixed")})
        runs.update(run_all({k: {"stacks": 150, **v} for k, v in multi.items()}, par=len(multi)))
    res["tp_runs"] = runs
    res["mixed_formats"] = {k: sorted({u.format for u in load_manifest(models[k])[0].units.values()})
                            for k in ("dense-mixed", "experts-mixed")}
    nxt = successor(json.loads((ll["base"] / "config.json").read_text())["vocab_size"])
    res["tp2_vs_tp1"] = {}
    for k, r in runs.items():
        if tp1_run(k):
            res["tp2_vs_tp1"][k] = tp_compare(runs.get(tp1_run(k), {"ok": False}), r)
        elif r.get("ok"):  # how confident TP=1 is: its greedy tokens follow the taught chain, by what margin
            seqs = [p[-1:] + x["ids"] for p, x in zip(prompts(len(r["outputs"])), r["outputs"])]
            follow = [int(b) == int(nxt[a]) for s in seqs for a, b in zip(s, s[1:])]
            res.setdefault("tp1_confidence", {})[k] = {
                "follows_chain": round(sum(follow) / len(follow), 4),
                "smallest_top2_margin": round(min(t[0][0] - t[1][0] for x in r["outputs"] for t in x["top"]), 4)}


def tp_compare(a: dict, b: dict) -> dict:
    """Per prompt: same greedy tokens? where not, the top-2 margin in TP=1's logprobs at the first difference (an exact
    tie there means the two runs only broke a tie differently)."""
    if not (a.get("ok") and b.get("ok")):
        return {"error": "a run failed"}
    out = []
    for x, y in zip(a["outputs"], b["outputs"]):
        n = next((i for i, (p, q) in enumerate(zip(x["ids"], y["ids"])) if p != q), None)
        out.append({"same": n is None} if n is None else
                   {"same": False, "first_diff": n, "tp1_top2_margin": round(x["top"][n][0][0] - x["top"][n][1][0], 5)})
    d = [abs(p - q) for x, y in zip(a["outputs"], b["outputs"]) for p, q in zip(x["input_lp"], y["input_lp"])
         if p is not None and q is not None]
    return {"prompts": out, "identical_prompts": sum(o["same"] for o in out), "of": len(out),
            "teacher_forced_max_abs_dlogprob": round(max(d), 5), "mean": round(sum(d) / len(d), 5)}


def synth_models(meta: dict, res: dict) -> tuple[dict[str, Path], Path]:
    """The 12-layer 8B-shaped model synthesized in each format, and the mixed build taking 3 layers from each;
    records which layers each format has and the bf16 bytes every checkpoint shares (embeddings, lm_head, norms)."""
    sys.path.insert(0, str(HERE))
    import synth

    t = time.time()
    tpl = meta["templates"]
    dirs = synth.main(WORK / "synth", tpl, WORK / "fixtures" / "base")
    log(f"synthesized {len(dirs)} checkpoints in {time.time() - t:.0f}s")
    order = list(tpl)  # fp8, int8, gptq, awq
    rules = "\n".join(f'- {{match: "*", layers: "{3 * i}-{3 * i + 2}", source: {k}}}' for i, k in enumerate(order))
    mixed = build("synth-mixed", dirs["base"], {k: dirs[k] for k in order}, order[0], rules)
    res["speed_layers"] = {k: [3 * i, 3 * i + 2] for i, k in enumerate(order)}
    cfg = synth.CONFIG
    h, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    res["speed_support_gb"] = (2 * v * h + (2 * n + 1) * h) * 2 / 2**30
    return {k: dirs[k] for k in order}, mixed


def run_queues(queues: list[list[tuple[str, Path]]], spec: dict) -> dict[str, dict]:
    """Speed Engines: queue i runs on GPU i, one Engine at a time (so none shares its GPU), the queues side by side."""
    def run_queue(gpu: int, runs: list[tuple[str, Path]]) -> dict:
        return {n: engine(f"speed-{n}", {**spec, "path": str(path), "gpu": gpu}, timeout=300) for n, path in runs}

    with ThreadPoolExecutor(len(queues)) as ex:
        parts = list(ex.map(run_queue, range(len(queues)), queues))
    return {k: v for p in parts for k, v in p.items()}


def speed(meta: dict, res: dict) -> None:
    dirs, mixed = synth_models(meta, res)
    spec = {"mode": "speed", "cuda_graph": True, "mem_fraction": 0.6, "max_total_tokens": 16384, "log_level": "info"}
    queues = [[(k, dirs[k]) for k in ("ct-fp8-dynamic", "gptq")] + [("mixed", mixed)],
              [(k, dirs[k]) for k in ("ct-w8a8", "awq")] + [("mixed-gpu1", mixed)]]
    if torch_gpus() < 2:
        queues = [queues[0] + queues[1][:2]]
    res["speed_runs"] = run_queues(queues, spec)


def memory(meta: dict, res: dict) -> None:
    """Weight memory only (no decode): the synthetic parts and the mixed build loaded side by side on one GPU."""
    dirs, mixed = synth_models(meta, res)
    spec = {"mode": "load", "mem_fraction": 0.08, "max_total_tokens": 4096, "log_level": "info", "gpu": 0}
    jobs = {n: {**spec, "path": str(path)} for n, path in [*dirs.items(), ("mixed", mixed)]}
    res["speed_runs"] = run_all(jobs, par=len(jobs))


def speed_verdicts(res: dict) -> list[str]:
    """Issue 6's targets, from the runs: mixed decode ≥ 0.97 × the blend of its parts (each part's share of layers,
    harmonic), load ≤ 1.2 × the slowest part, weight memory = the parts' shares summed (± 1 %)."""
    runs, layers = res["speed_runs"], res["speed_layers"]
    n = sum(b - a + 1 for a, b in layers.values())
    share = {k: (b - a + 1) / n for k, (a, b) in layers.items()}
    mixed = [r for k, r in runs.items() if k.startswith("mixed") and r.get("ok")]
    if not mixed or not all(runs.get(k, {}).get("ok") for k in share):
        return ["incomplete: a run failed"]
    out = []
    if all("weight_bytes" in r for r in runs.values()):  # exact bytes (gpu/measure_plugin.py), rank 0
        b = lambda r: r["weight_bytes"][0]["total"]  # noqa: E731
        expect = sum(f * b(runs[k]) for k, f in share.items())
        out.append(f"exact weight bytes (parameters + buffers on the GPU): parts' shares sum to {expect / 2**30:.4f} "
                   f"GiB; mixed {', '.join(f'{b(r) / 2**30:.4f} ({b(r) / expect - 1:+.3%})' for r in mixed)}; "
                   f"by dtype: mixed {mixed[0]['weight_bytes'][0]['by_dtype']}")
    if "decode" not in mixed[0]:  # memory-only run: its Engines load side by side, so SGLang's own figure (the drop
        # in free device memory across one load) also counts the others' allocations and means nothing here
        return out + ["SGLang's weight figure is not comparable in this run: the Engines loaded at the same time"]
    for bs in ("bs1_tok_s", "bs8_tok_s"):
        blend = 1 / sum(f / runs[k]["decode"][bs] for k, f in share.items())
        got = [r["decode"][bs] / blend for r in mixed]
        out.append(f"{bs}: blend {blend:.1f}, mixed/blend {', '.join(f'{g:.3f}' for g in got)} (target ≥ 0.97)")
    slowest = max(runs[k]["load_s"] for k in share)
    out.append(f"load: mixed {', '.join(str(r['load_s']) for r in mixed)} s vs slowest part {slowest} s "
               f"(target ≤ {1.2 * slowest:.1f})")
    w = lambda r: r["server_memory"]["memory_usage"]["weight"]  # noqa: E731
    expect = sum(f * w(runs[k]) for k, f in share.items())  # support bytes are the same in every part
    out.append(f"weight memory: parts' shares sum to {expect:.3f} GiB; mixed "
               f"{', '.join(f'{w(r):.3f} ({w(r) / expect - 1:+.2%})' for r in mixed)} (target ± 1 %)")
    return out


def per_layer_verdicts(res: dict) -> list[str]:
    """A mixed layer's error (near-tie tokens aside, see per_layer) must lie within the band of the single formats its
    groups use: their own native layers' errors vs their own dequantized weights, same layer, same prompts."""
    pl, out = res["per_layer"], []
    fmt_run = {"fp8": "pure-fp8", "int8": "pure-int8", "gptq": "pure-gptq", "unquantized": "bf16"}
    err = lambda run, block: pl.get(run, {}).get(block, {}).get("rel_error_without_near_ties")  # noqa: E731
    for run in pl:
        units = res["mixed_units"].get(tp1_run(run) or run)
        if units is None:
            continue
        for unit, groups in units.items():
            block = unit.rsplit(".", 1)[0]
            got, band = err(run, block), [err(fmt_run[g["format"]], block) for g in groups]
            if got is None or None in band:
                out.append(f"{run} {block}: not measured (it or a single-format run is missing)")
                continue
            out.append(f"{run} {block} ({'+'.join(g['format'] for g in groups)}): {got} vs its formats' "
                       f"{band} — {'within' if got <= max(band) * 1.1 else 'OUTSIDE'} the band (≤ max × 1.1)")
    return out


def moe_speed_verdicts(res: dict) -> list[str]:
    runs = res["moe_speed_runs"]
    if not all(runs.get(k, {}).get("ok") for k in ("pure-fp8", "pure-int8", "split-fp8", "mixed-experts")):
        return ["incomplete: a run failed"]
    f, out = res["moe_speed_fp8_share"], []
    for bs in runs["pure-fp8"]["decode"]:
        tok = {k: r["decode"][bs] for k, r in runs.items()}
        blend = 1 / (f / tok["pure-fp8"] + (1 - f) / tok["pure-int8"])
        out.append(f"{bs}: two FP8 groups / one FP8 layer {tok['split-fp8'] / tok['pure-fp8']:.3f} (the group calls' "
                   f"cost); mixed / byte-weighted blend {tok['mixed-experts'] / blend:.3f} (target ≥ 0.97)")
    return out


def moe_bench_lines(runs: dict, fp8_share: float) -> list[str]:
    """The first MoE block alone, in a CUDA graph (gpu/measure_plugin.py): µs per call, and the same ratios as the
    decode rows (a time ratio inverted: > 1 is faster)."""
    bench = {k: r["moe_bench"] for k, r in runs.items() if "moe_bench" in r}
    if not {"pure-fp8", "split-fp8", "pure-int8", "mixed-experts"} <= set(bench):
        return []
    out = ["", "One MoE block alone (router, top-k, experts) in a CUDA graph, µs per call:", "",
           "| batch | pure FP8 | two FP8 groups | pure Int8 | mixed | one FP8 layer / two groups | "
           "byte-weighted blend / mixed |", "|---|" + "---|" * 6]
    # (run 4b's side-stream variant also timed the groups in sequence: its results.json and docs §7 have those)
    for bs in bench["pure-fp8"]["as served"]:
        t = {k: b["as served"][bs] for k, b in bench.items()}
        blend = fp8_share * t["pure-fp8"] + (1 - fp8_share) * t["pure-int8"]
        out.append(f"| {bs} | {t['pure-fp8']} | {t['split-fp8']} | {t['pure-int8']} | {t['mixed-experts']} | "
                   f"{t['pure-fp8'] / t['split-fp8']:.3f} | {blend / t['mixed-experts']:.3f} |")
    return out


def speed_table(runs: dict, sizes: tuple[int, ...], sglang_weight: bool, digits: int,
                rate: str = "decode tok/s") -> list[str]:
    """One row per speed Engine: outcome, load time, (SGLang's weight figure,) exact weight GiB, decode tok/s."""
    cols = ["checkpoint", "ok", "load s", *(["weight GB (SGLang)"] if sglang_weight else []), "exact weight GiB",
            f"{rate} bs{sizes[0]}", *(f"bs{b}" for b in sizes[1:])]
    L = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for k, r in runs.items():
        d = r.get("decode", {})
        cells = [k, "OK" if r.get("ok") else "FAIL: " + r.get("error", "")[-120:], r.get("load_s", ""),
                 *([r.get("weight_gb_log", "")] if sglang_weight else []),
                 f"{r['weight_bytes'][0]['total'] / 2**30:.{digits}f}" if "weight_bytes" in r else "",
                 *(d.get(f"bs{b}_tok_s", "") for b in sizes)]
        L.append("| " + " | ".join(map(str, cells)) + " |")
    return L


def runs_table(res: dict) -> list[str]:
    """One row per Engine run: outcome, load time, the first tokens of prompt 0, and its distance from bf16."""
    L = ["| run | ok | load s | tokens (prompt 0) | vs bf16: mean/max |Δlogprob|, top-1 agreement |",
         "|---|---|---|---|---|"]
    for k, r in res["runs"].items():
        vb = res["vs_bf16"].get(k, {})
        L.append(f"| {k} | {'OK' if r.get('ok') else 'FAIL: ' + r.get('error', '')[-120:].replace('|', '/')} | "
                 f"{r.get('load_s', '')} | {r['outputs'][0]['ids'][:8] if r.get('outputs') else ''} | "
                 f"{vb.get('mean_abs_dlogprob', '')} / {vb.get('max_abs_dlogprob', '')}, {vb.get('top1_agreement', '')} |")
    return L


def tp_table(res: dict) -> list[str]:
    L = ["## TP=2 / EP=2 vs TP=1, taught models (4 prompts × 16 greedy tokens)", "",
         f"mixed formats: {res['mixed_formats']}; TP=1's confidence: {res.get('tp1_confidence')}", "",
         "| run | vs its TP=1 run: identical prompts | first differences | teacher-forced max / mean |Δlogprob| |",
         "|---|---|---|---|"]
    for k, c in res["tp2_vs_tp1"].items():
        if "error" in c:
            L.append(f"| {k} | {c['error']}: {res['tp_runs'].get(k, {}).get('error', '')[-120:]} | | |")
            continue
        diffs = [p for p in c["prompts"] if not p["same"]]
        L.append(f"| {k} | {c['identical_prompts']} of {c['of']} | {diffs or '—'} | "
                 f"{c['teacher_forced_max_abs_dlogprob']} / {c['mean']} |")
    return L + [""]


def summarize(part: str, res: dict) -> str:
    L = [f"# mpconvert GPU proof — {part} part", "", f"card: {res.get('card')}; SGLang {res.get('sglang')}; "
         f"torch {res.get('torch')}; {time.strftime('%Y-%m-%d')}", ""]
    if "runs" in res and part != "experts":
        L += ["## Fidelity (tiny real quantizer outputs)", ""] + runs_table(res)
        L += ["", "| source S | served S vs served pure-S recipe |", "|---|---|"]
        for k, c in res["identity"].items():
            verdict = {True: "IDENTICAL", False: "DIFFERENT", None: "NOT MEASURED"}[c.get("identical")]
            L.append(f"| {k} | {verdict} {c} |")
        L += ["", f"mixed formats: {res['mixed_formats']}; TP=2 vs TP=1: {res['tp2_vs_tp1']}", ""]
        L += [f"- {k} must fail: {v}" for k, v in res.get("expected_failures", {}).items()]
        L += [f"- shared experts fusion, {k}: {v}" for k, v in res.get("fusion", {}).items()]
        if "spec_vs_plain" in res:
            L += [f"- speculative decoding (NEXTN) vs without, {k}: {v}" for k, v in res["spec_vs_plain"].items()]
            L += [f"- the MTP layer's units in the mixed build: {res['mtp_layer_units']}", ""]
    if part == "experts" and "runs" in res:
        L += ["## Expert-level mixed precision (tiny Qwen3-MoE, 8 experts, top-2, real quantizer outputs)", ""]
        L += [f"- {name}: {units}" for name, units in res["mixed_units"].items()] + [""] + runs_table(res)
        L += ["", *[f"- {k}: {v}" for k, v in res["identity"].items()],
              f"- vs the dequantized reference (mean/max |Δlogprob|, top-1): {res['vs_dequantized_ref']}",
              f"- TP/EP vs TP=1: {res.get('tp2_vs_tp1', 'not run (one GPU)')}", ""]
        L += ["### Per MoE layer: SGLang's block vs the reference block (transformers, fp32) on the same inputs", "",
              "| run | reference | " + " | ".join(f"layer {i}" for i in range(res["n_layers"])) + " |",
              "|---|---|" + "---|" * res["n_layers"]]
        for k, layers in res["per_layer"].items():
            cells = [f"{v['rel_error_without_near_ties']} ({v['near_ties']} near-tie tokens aside; all: "
                     f"{v['rel_error']}, cos {v['cosine']})" for v in layers.values()] if "error" not in layers \
                else [layers["error"]]
            ref = "bf16 weights" if k == "bf16" else "its dequantized weights"
            L.append(f"| {k} | {ref} | " + " | ".join(cells) + " |")
        L += ["", *[f"- {line}" for line in per_layer_verdicts(res)], ""]
    if "moe_speed_runs" in res:
        L += ["## Decode speed, expert-level mixed precision (Qwen3-30B-A3B-shaped, 8 layers, synthetic)", "",
              f"model: {res['moe_speed_model']}; FP8 share of the mixed model's linear bytes "
              f"{res['moe_speed_fp8_share']:.3f}", "",
              *speed_table(res["moe_speed_runs"], (1, 8, 32), sglang_weight=False, digits=3, rate="tok/s")]
        L += [""] + [f"- {line}" for line in moe_speed_verdicts(res)]
        L += moe_bench_lines(res["moe_speed_runs"], res["moe_speed_fp8_share"]) + [""]
    if "tp_runs" in res:
        L += tp_table(res)
    if "speed_runs" in res:
        L += ["## Speed and memory (12-layer Llama-8B-shaped synthetic model)", "",
              *speed_table(res["speed_runs"], (1, 8), sglang_weight=True, digits=4)]
        L += ["", f"layers per format in the mixed build: {res['speed_layers']}; bf16 embeddings/lm_head/norms "
              f"{res['speed_support_gb']:.3f} GiB", ""] + [f"- {line}" for line in speed_verdicts(res)]
    return "\n".join(L) + "\n"


def main(part: str, out: Path) -> None:
    import torch

    global WORK
    meta = json.loads((STAGE / "part.json").read_text())
    WORK = WORK / part  # several parts in one call (gpu/e2e.sh once per part) keep their fixtures and logs apart
    WORK.mkdir(parents=True, exist_ok=True)
    with tarfile.open(STAGE / "fixtures.tar.xz") as t:
        t.extractall(WORK)
    res = {"part": part, "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
           "gpus": torch.cuda.device_count(),
           "torch": torch.__version__}
    import importlib.metadata as md

    res["sglang"] = md.version("sglang") if md.packages_distributions().get("sglang") else None
    res["mpconvert_plugin"] = [e.value for e in md.entry_points(group="sglang.srt.plugins")]
    log(f"{res}")
    moe_speed = part in ("experts", "tp")  # these parts' speed run is the mixed-experts one
    try:
        if os.environ.get("E2E_FIDELITY", "1") == "1":
            {"experts": experts, "tp": tp_identity, "mtp": mtp}.get(part, lambda m, r: fidelity(part, m, r))(meta, res)
        json.dump(res, open(out / "results.json", "w"), indent=1)
        if os.environ.get("E2E_SPEED") == "1":
            (experts_speed if moe_speed else speed)(meta, res)
        elif os.environ.get("E2E_MEMORY") == "1":
            memory(meta, res)
    finally:
        json.dump(res, open(out / "results.json", "w"), indent=1)
        try:
            report = summarize(part, res)
        except Exception as e:  # partial results: the JSON has everything
            report = f"(summary failed: {e!r}; see results.json)\n"
        (out / "report.md").write_text(report)
        print(report)
        (WORK / "logs").mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "logs.tar.xz", "w:xz") as t:
            t.add(WORK / "logs", arcname="logs")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
