"""A second SGLang plugin, for the GPU proof only (gpu/e2e.sh installs it beside mpconvert's). In each scheduler worker:

- after the model has loaded (process_weights_after_loading included), print the bytes its parameters and buffers
  hold on the device, by dtype, one storage counted once — the exact weight memory, beside SGLang's own figure (the
  drop in free device memory across loading, which also counts kernel code loaded and workspaces);
- with E2E_DUMP_DIR set, record the input and output of every MoE block (`model.layers.N.mlp` of a *SparseMoeBlock
  class) on its first prefill batches (up to 4 forward calls of ≥ 16 tokens), to compare each layer with a reference
  outside SGLang (gpu/driver.py). Fidelity runs only: a hook cannot copy to the host inside CUDA-graph capture;
- with E2E_STACKS=S set, dump every thread's stack to the log if the worker is still alive after S seconds (where a
  hung TP Engine waits).
A measurement must never break the run it measures: every failure here is printed and swallowed.
"""
import json
import os


def _after_load(result, runner, *args, **kwargs):
    for what in (_report, _dump_hooks):
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

    n = 0
    for name, module in runner.model.named_modules():
        if name.endswith(".mlp") and type(module).__name__.endswith("SparseMoeBlock"):
            module.register_forward_pre_hook(lambda m, a, k, name=name: before(m, a, k, name), with_kwargs=True)
            module.register_forward_hook(lambda m, a, k, o, name=name: after(m, a, k, o, name), with_kwargs=True)
            n += 1
    print(f"E2E_DUMP_HOOKS {n} MoE blocks on rank {rank} -> {out}", flush=True)


def register():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if os.environ.get("E2E_STACKS"):
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(float(os.environ["E2E_STACKS"]), exit=False, file=sys.stderr)
    HookRegistry.register("sglang.srt.model_executor.model_runner.ModelRunner.load_model", _after_load,
                          HookType.AFTER)
