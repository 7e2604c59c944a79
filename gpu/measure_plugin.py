"""A second SGLang plugin, for the GPU proof only (gpu/e2e.sh installs it beside mpconvert's). In each scheduler worker:

- after the model has loaded (process_weights_after_loading included), print the bytes its parameters and buffers
  hold on the device, by dtype, one storage counted once — the exact weight memory, beside SGLang's own figure (the
  drop in free device memory across loading, which also counts kernel code loaded and workspaces);
- which MoE layers SGLang fused shared experts into (E2E_FUSED_SHARED);
- with E2E_DUMP_DIR set, record the input and output of every MoE block (`model.layers.N.mlp` of a *SparseMoeBlock
  class) on its first prefill batches (up to 4 forward calls of ≥ 16 tokens), to compare each layer with a reference
  outside SGLang (gpu/driver.py). Fidelity runs only: a hook cannot copy to the host inside CUDA-graph capture;
- with E2E_MOE_BENCH=1 set (TP=1), time the first MoE block alone (router, top-k and experts) in a CUDA graph at
  decode batch sizes, on the same seeded inputs in every checkpoint — the extra group calls' cost without the
  scheduler's noise (run 4b also timed mixed layers with their groups on side streams); and its kernels at batch 32
  (torch.profiler, eager);
- with E2E_STACKS=S set, dump every thread's stack to the log if the worker is still alive after S seconds (where a
  hung TP Engine waits).
A measurement must never break the run it measures: every failure here is printed and swallowed.
"""
import json
import os


def _after_load(result, runner, *args, **kwargs):
    for what in (_report, _fused_shared, _dump_hooks, _moe_bench):
        try:
            what(runner)
        except Exception as e:
            print(f"E2E_PLUGIN_FAILED {what.__name__}: {e!r}", flush=True)
    return result


def _report(runner) -> None:
    import torch

    seen, by_dtype = set(), {}
    for t in list(runner.model.parameters()) + list(runner.model.buffers()):
        if t.device.type != "cuda":
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + s.nbytes()
    torch.cuda.synchronize()
    print("E2E_WEIGHT_BYTES " + json.dumps({"tp_rank": runner.ps.tp_rank, "by_dtype": by_dtype,
                                            "total": sum(by_dtype.values()),
                                            "allocated": torch.cuda.memory_allocated()}), flush=True)


def _fused_shared(runner) -> None:
    """Which FusedMoE layers SGLang fused shared experts into (on a GPU: DeepSeek-V3 at 256 experts, GLM-4.5), and
    how many: where the shim let fusion happen and where it turned it off."""
    from mpconvert.runtime_shim.sglang_config import fused_shared_experts

    print("E2E_FUSED_SHARED " + json.dumps({"tp_rank": runner.ps.tp_rank, "fused": fused_shared_experts(runner.model)}),
          flush=True)


def _moe_blocks(model):
    """(name, module) of every MoE block: `model.layers.N.mlp` of a *SparseMoeBlock class."""
    return [(n, m) for n, m in model.named_modules()
            if n.endswith(".mlp") and type(m).__name__.endswith("SparseMoeBlock")]


def _dump_hooks(runner) -> None:
    out = os.environ.get("E2E_DUMP_DIR")
    if not out:
        return
    import torch

    os.makedirs(out, exist_ok=True)
    rank = runner.ps.tp_rank
    seen: dict = {}
    pending: dict = {}

    def before(module, args, kwargs, name):
        # the input is copied before the block runs: SGLang's plain fused MoE writes its output into it (inplace)
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is not None and x.shape[0] >= 16 and len(seen.get(name, [])) < 4:
            pending[name] = x.detach().float().cpu()

    def after(module, args, kwargs, output, name):
        # prefill batches only (the driver's prompts are 32 tokens each; decode steps carry one token per prompt)
        x = pending.pop(name, None)
        if x is None:
            return
        calls = seen.setdefault(name, [])
        calls.append({"input": x, "output": output.detach().float().cpu()})
        torch.save(calls, os.path.join(out, f"rank{rank}.{name}.pt"))

    blocks = _moe_blocks(runner.model)
    for name, module in blocks:
        module.register_forward_pre_hook(lambda m, a, k, name=name: before(m, a, k, name), with_kwargs=True)
        module.register_forward_hook(lambda m, a, k, o, name=name: after(m, a, k, o, name), with_kwargs=True)
    print(f"E2E_DUMP_HOOKS {len(blocks)} MoE blocks on rank {rank} -> {out}", flush=True)


def _moe_bench(runner, sizes=(1, 8, 32, 128), replays=200) -> None:
    if os.environ.get("E2E_MOE_BENCH") != "1":
        return
    from sglang.srt.model_executor.runner import model_capture_mode

    name, block = _moe_blocks(runner.model)[0]
    result = {"block": name, "mixed": type(block.experts.quant_method).__name__ == "MixedExpertsMethod",
              "as served": {bs: _time_block(block, bs, replays, model_capture_mode) for bs in sizes},
              "kernels at batch 32, as served": _kernels(block, 32, model_capture_mode)}
    if os.environ.get("E2E_SUM_PROBE") == "1":
        result["top-k sum probe"] = _sum_probe()
    print("E2E_MOE_BENCH " + json.dumps(result), flush=True)


def _sum_probe() -> dict:
    """SGLang's compiled top-k sum (moe_sum_reduce_torch_compile, ≤ 32 tokens) ran 41 µs at batch 32 in run 4b's
    Int8 and mixed workers and 6 µs in its FP8-only ones. Time it on fresh [32, 8, hidden] inputs as this worker has
    it compiled; then, after torch._dynamo.reset(), compiled for 32 tokens first (static shape), then after a call
    with 8 tokens (recompiled with a dynamic token count); with its compile state. (Run 4d: 2.6 µs on GPU 0 and 5.8 µs
    on GPU 1 in every variant — the GPU, not the compile state.)"""
    import torch
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe

    f = fused_moe.moe_sum_reduce_torch_compile

    def device_us(m: int, calls: int = 20) -> float:
        from torch.profiler import ProfilerActivity, profile

        x = torch.randn(m, 8, 2048, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, 2048, device="cuda", dtype=torch.bfloat16)
        f(x, out, 1.0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                f(x, out, 1.0)
            torch.cuda.synchronize()
        return round(sum(e.device_time_total for e in prof.key_averages()) / calls, 2)

    import torch._dynamo
    import torch._inductor.config as ic

    probe = {"as compiled here, 32 tokens": device_us(32),
             "dynamo counters": {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v},
             "inductor": {k: getattr(ic, k, None) for k in ("max_autotune", "coordinate_descent_tuning",
                                                           "max_autotune_pointwise")}}
    torch._dynamo.reset()
    probe["after reset: 32 tokens first (static)"] = device_us(32)
    device_us(8)
    probe["then 8 tokens, then 32 (dynamic)"] = device_us(32)
    return probe


def _inputs(block, bs: int):
    import torch

    g = torch.Generator(device="cuda").manual_seed(bs)
    return torch.randn(bs, block.gate.weight.shape[1], generator=g, device="cuda", dtype=block.gate.weight.dtype)


def _kernels(block, bs: int, capture_mode, calls: int = 20) -> list:
    """The block's kernels (eager, in capture mode's code path): [name, launches per call, µs per call], top 15."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x0 = _inputs(block, bs)
    with capture_mode():
        block(x0.clone())
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                block(x0.clone())
            torch.cuda.synchronize()
    rows = [(e.key, e.count / calls, e.device_time_total / calls) for e in prof.key_averages()
            if e.device_time_total > 0]
    return [[k[:90], round(c, 2), round(t, 2)] for k, c, t in sorted(rows, key=lambda r: -r[2])[:15]]


def _time_block(block, bs: int, replays: int, capture_mode) -> float:
    """µs per call of block on bs seeded tokens, replayed from a CUDA graph captured as SGLang captures decode."""
    import torch

    x0 = _inputs(block, bs)
    with capture_mode():
        for _ in range(3):  # warm-up: Triton JIT
            block(x0.clone())
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            block(x0.clone())  # the plain fused MoE writes into its input: every replay starts from x0
    for _ in range(20):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1000 / replays, 2)


def register():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if os.environ.get("E2E_STACKS"):
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(float(os.environ["E2E_STACKS"]), exit=False, file=sys.stderr)
    HookRegistry.register("sglang.srt.model_executor.model_runner.ModelRunner.load_model", _after_load,
                          HookType.AFTER)
