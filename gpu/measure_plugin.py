"""A second SGLang plugin, for the GPU proof only (gpu/e2e.sh installs it beside mpconvert's): after each scheduler
worker has loaded its model (process_weights_after_loading included), print the bytes its parameters and buffers hold
on the device, by dtype, one storage counted once — the exact weight memory, beside SGLang's own figure (the drop in
free device memory across loading, which also counts kernel code loaded and workspaces)."""
import json


def _weight_bytes(result, runner, *args, **kwargs):
    try:  # a measurement must never break the run it measures
        _report(runner)
    except Exception as e:
        print(f"E2E_WEIGHT_BYTES_FAILED {e!r}", flush=True)
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


def register():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.model_executor.model_runner.ModelRunner.load_model", _weight_bytes,
                          HookType.AFTER)
