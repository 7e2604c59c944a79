"""One SGLang Engine in its own process: load DIR, run the fixed prompts (or the decode benchmark), print RESULT json.

Usage: engine_child.py SPEC_JSON. SPEC: {"path", "tp", "ep", "gpu", "dtype", "quantization",
"mode": "fidelity"|"speed"|"load", "cuda_graph": bool, "batch_sizes": [1, 8], "ar_fusion": bool, "dump": DIR (MoE
blocks' inputs/outputs), "stacks": S (thread stacks after S seconds), "speculative": {Engine arguments, e.g.
speculative_algorithm: NEXTN}}. Run by gpu/driver.py; SGLang spawns its
scheduler per Engine, so each Engine gets a process.
"""
import json
import os
import random
import sys
import time


def prompts(n=4, length=32, vocab=1000, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def pack_outputs(r: list[dict]) -> list[dict]:
    """What the driver compares, from a generate answer (Engine or HTTP /generate: the same fields); with speculative
    decoding also how many verify steps produced the tokens (SGLang's spec_verify_ct)."""
    return [{"ids": x["output_ids"],
             "top": [[[round(lp, 5), tid] for lp, tid, *_ in step] for step in x["meta_info"]["output_top_logprobs"]],
             "input_lp": [None if lp is None else round(lp, 5) for lp, *_ in x["meta_info"]["input_token_logprobs"]],
             "input_top1": [None if not step else step[0][1] for step in x["meta_info"]["input_top_logprobs"]],
             **({"spec_verify_ct": x["meta_info"]["spec_verify_ct"]} if x["meta_info"].get("spec_verify_ct") else {})}
            for x in r]


def main(spec: dict) -> dict:
    t0 = time.time()
    # read by gpu/measure_plugin.py in the scheduler workers this Engine spawns
    if spec.get("dump"):
        os.environ["E2E_DUMP_DIR"] = spec["dump"]
    if spec.get("stacks"):
        os.environ["E2E_STACKS"] = str(spec["stacks"])
    import sglang as sgl

    t_import = time.time() - t0
    kw = dict(model_path=spec["path"], attention_backend="triton", sampling_backend="pytorch", grammar_backend="none",
              skip_tokenizer_init=True, log_level=spec.get("log_level", "error"), dtype=spec.get("dtype", "auto"),
              tp_size=spec.get("tp", 1), ep_size=spec.get("ep", 1), base_gpu_id=spec.get("gpu", 0),
              mem_fraction_static=spec.get("mem_fraction", 0.1), max_total_tokens=spec.get("max_total_tokens", 2048),
              disable_cuda_graph=not spec.get("cuda_graph", False))
    sizes = spec.get("batch_sizes", [1, 8])
    if spec.get("cuda_graph"):  # decode graphs for the batch sizes measured; no prefill graphs
        kw.update(cuda_graph_bs_decode=sizes, disable_prefill_cuda_graph=True)
    if os.environ.get("E2E_NO_CUSTOM_AR") == "1" and spec.get("tp", 1) > 1:
        kw["disable_custom_all_reduce"] = True
    if spec.get("tp", 1) > 1 and not spec.get("ar_fusion"):
        # SGLang turns FlashInfer's all-reduce fusion on for Qwen3-MoE (and other MoE archs) at TP>1 on sm90; its
        # workspace JIT-compiles FlashInfer's TRT-LLM comm kernels at start-up, for minutes, while the other rank waits
        # at a barrier (what looked like a hang after loading, 2026-11-28; the stacks are in that run's logs)
        kw["enforce_disable_flashinfer_allreduce_fusion"] = True
    if spec.get("nccl_port"):  # Engines started side by side otherwise race for a free port (EADDRINUSE)
        kw["nccl_port"] = spec["nccl_port"]
    if spec.get("quantization"):
        kw["quantization"] = spec["quantization"]
    kw.update(spec.get("speculative", {}))
    t1 = time.time()
    e = sgl.Engine(**kw)
    load_s = time.time() - t1
    info = {}
    try:
        st = e.get_server_info().get("internal_states") or [{}]
        info = {k: v for k, v in st[0].items() if "mem" in k or "weight" in k}
    except Exception as ex:  # informational only
        info = {"error": repr(ex)}
    out = {"load_s": round(load_s, 2), "import_s": round(t_import, 2), "server_memory": info}
    if spec.get("mode", "fidelity") == "fidelity":
        ps = prompts(int(os.environ.get("E2E_PROMPTS", "4")))
        r = e.generate(input_ids=ps, sampling_params={"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
                       return_logprob=True, top_logprobs_num=5, logprob_start_len=0)
        out["outputs"] = pack_outputs(r)
    elif spec["mode"] == "speed":
        sp = lambda n: {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}  # noqa: E731
        e.generate(input_ids=prompts(1, 32), sampling_params=sp(16))  # warm-up (Triton JIT, graphs)
        res = {}
        for bs in sizes:
            ps = prompts(bs, 32, seed=bs)
            best = None
            for _ in range(3):
                ta = time.time()
                e.generate(input_ids=ps, sampling_params=sp(1))
                tb = time.time()
                e.generate(input_ids=ps, sampling_params=sp(257))
                tc = time.time()
                tps = bs * 256 / ((tc - tb) - (tb - ta))
                best = tps if best is None else max(best, tps)
            res[f"bs{bs}_tok_s"] = round(best, 1)
        out["decode"] = res
    e.shutdown()
    return out


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    try:
        print("RESULT " + json.dumps({"ok": True, **main(spec)}), flush=True)
    except Exception as ex:
        import traceback

        traceback.print_exc()
        print("RESULT " + json.dumps({"ok": False, "error": repr(ex)[-800:]}), flush=True)
    os._exit(0)
