"""Build the SGLang model for a converted directory on CPU, through the shim, with SGLang's own loader path; load it.

What `mpconvert verify --engine sglang` runs (and the shim tests): SGLang's real classes construct every layer and
pick its quant method exactly as on a GPU, and SGLang's real `load_weights` fills the parameters — everything up to
`process_weights_after_loading`, which needs the GPU.

Usage: python -m mpconvert.runtime_shim.engine_check DIR INIT_METHOD [TP RANK [EP]]; for TP=N run N of them at once
(gloo ranks meeting at INIT_METHOD, e.g. file:///tmp/x/rendezvous; EP splits the experts over them as SGLang's --ep
does), one process per rank (SGLang keeps process-global distributed state). SGLANG_DTYPE picks the model dtype
(default auto), MPCONVERT_SERVER_ARGS adds server arguments (a JSON object). Prints one JSON line:
{"methods": {layer prefix: [quant method class, scheme class]}, "moe": {FusedMoE prefix: [experts routed over,
experts held]}, "fused_shared": {FusedMoE prefix: shared experts SGLang fused into it}, "loaded": [...],
"params": {name: [dtype, shape, sha256 of its bytes after load_weights]}, "untouched": [parameters load_weights never
wrote]}. A DeepSeek-V3 directory with an MTP layer also builds SGLang's NextN draft model (what speculative decoding
loads from it): its layers and parameters join these under the checkpoint's names (model.layers.N.*), and "draft"
names its class.

{..., "error": "..."} when SGLang or the shim refuses the model (e.g. a GPTQ MoE layer in a bf16 model).

Stand-ins for the GPU this machine lacks (DESIGN.md §6); none replaces SGLang code that runs here: the device
capability is answered as sm_90 (compressed-tensors and Marlin ask at construction; H100/H200 is what we serve on),
and RoPE's import of `vllm._custom_ops.rotary_embedding` gets a function that raises (it only runs in a forward,
which this never does).
"""
import json
import os
import sys
import types
from pathlib import Path

import torch


def scaffold():
    # no NCCL on a CPU machine: SGLang's own non-GPU path disables PyNccl when its library cannot be loaded
    os.environ["SGLANG_NCCL_SO_PATH"] = "/nonexistent/libnccl.so"
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    v, ops = types.ModuleType("vllm"), types.ModuleType("vllm._custom_ops")

    def no_forward(*a, **k):
        raise RuntimeError("no forward in CPU tests")

    ops.rotary_embedding = no_forward
    v._custom_ops = ops
    sys.modules.setdefault("vllm", v)
    sys.modules.setdefault("vllm._custom_ops", ops)
    import sglang.srt.layers.quantization.marlin_utils as mu

    mu.get_device_capability = lambda *a, **k: (9, 0)


MARK = 0xA5  # byte pattern written into every parameter before loading
# parameters no checkpoint tensor fills: SGLang derives them in process_weights_after_loading (GPTQ-Marlin MoE's sort
# order of g_idx; compressed-tensors WNA16 MoE's weight_g_idx, replaced by an empty one unless actorder is "group",
# which mpconvert refuses)
DERIVED = ("g_idx_sort_indices", "weight_g_idx")


def sha(t) -> str:
    import hashlib

    t = t.detach().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def main(path: str, init_method: str, tp: int = 1, rank: int = 0, ep: int = 1):
    scaffold()
    try:
        print("RESULT " + json.dumps(build_and_load(path, init_method, tp, rank, ep)))
    except ValueError as e:  # SGLang's and the shim's refusals of a model (load-time errors on a GPU too)
        print("RESULT " + json.dumps({"error": str(e)}))


def build_and_load(path: str, init_method: str, tp: int, rank: int, ep: int = 1) -> dict:
    from safetensors import safe_open
    from sglang.srt.plugins import load_plugins

    load_plugins()  # discovers mpconvert through the sglang.srt.plugins entry point
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    # SGLang logs a plugin that fails to load and goes on (a compressed-tensors export is checked with none)
    if os.environ.get("SGLANG_PLUGINS") != "no-plugins" and "mpconvert" not in QUANTIZATION_METHODS:
        from mpconvert.runtime_shim import load_problem

        raise ValueError(load_problem() or "SGLang did not load the mpconvert plugin")
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.loader import _get_quantization_config
    from sglang.srt.server_args import ServerArgs

    from mpconvert.runtime_shim.sglang_versions import init_rank, version

    sa = ServerArgs(model_path=path, device="cpu", tp_size=tp, ep_size=ep, dtype=os.environ.get("SGLANG_DTYPE", "auto"),
                    **_more_server_args(ServerArgs))
    mc = init_rank(sa, tp, rank, ep, init_method)
    lc = LoadConfig()
    qc = _get_quantization_config(mc, lc)
    names = []  # every tensor name the model proper was handed

    def weights(record: bool = True):
        for f in sorted(Path(path).glob("model-*.safetensors")):
            with safe_open(f, "pt") as fh:
                for k in fh.keys():
                    if record:
                        names.append(k)
                    yield k, fh.get_tensor(k)

    out = build_one(mc, lc, qc, weights)
    if _has_mtp_layer(mc.hf_config, path):
        # SGLang's speculative decoding (NextN) builds a draft model from the same directory: its MTP layer must bind
        # the manifest's formats too. Its layers are reported under the checkpoint's names (model.layers.N.*); its
        # embed_tokens and lm_head are the main model's at serving time (SGLang's EAGLE worker sets them), so left out.
        draft_mc = ModelConfig.from_server_args(sa, is_draft_model=True)
        draft = build_one(draft_mc, lc, _get_quantization_config(draft_mc, lc), lambda: weights(record=False))
        n = mc.hf_config.num_hidden_layers
        for key in ("methods", "moe", "fused_shared", "params"):
            out[key].update({_checkpoint_name(k, n): v for k, v in draft[key].items() if not k.endswith(SHARED)})
        out["untouched"] += [_checkpoint_name(k, n) for k in draft["untouched"] if not k.endswith(SHARED)]
        out["draft"] = draft_mc.hf_config.architectures[0]
    from sglang.srt.runtime_context import get_parallel

    return {"sglang": version(), "ep": get_parallel().moe_ep_size, "ep_rank": get_parallel().moe_ep_rank,
            "quant_config": type(qc).__name__, "min_capability": qc.get_min_capability(),
            "act_dtypes": [str(d) for d in qc.get_supported_act_dtypes()], "loaded": names, **out}


def _more_server_args(server_args_class) -> dict:
    """MPCONVERT_SERVER_ARGS: more of SGLang's server arguments as a JSON object, e.g. {"enforce_shared_experts_fusion":
    true} for the fused shared-experts load path SGLang takes on a GPU only (DeepSeek-V3 at 256 experts, GLM-4.5).
    Checked here, so that what ServerArgs itself refuses keeps its own message."""
    import inspect

    text = os.environ.get("MPCONVERT_SERVER_ARGS") or "{}"

    def bad(why) -> ValueError:
        return ValueError(f"MPCONVERT_SERVER_ARGS={text!r} is not a JSON object of SGLang server arguments ({why}); "
                          f"fix or unset it")

    try:
        extra = json.loads(text)
    except ValueError as e:
        raise bad(e) from None
    if not isinstance(extra, dict):
        raise bad("not an object")
    unknown = sorted(extra.keys() - inspect.signature(server_args_class).parameters.keys())
    if unknown:
        raise bad(f"no such arguments: {unknown}")
    return extra


SHARED = ("embed_tokens.weight", "lm_head.weight")  # a NextN draft's: the main model's at serving time


def build_one(mc, lc, qc, weights) -> dict:
    """Build one SGLang model on CPU and load the directory's weights into it: the quant method of each layer, the
    FusedMoE expert counts, every parameter's bytes after load_weights, and the parameters it never wrote."""
    from sglang.srt.model_loader.loader import _initialize_model
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    from mpconvert.runtime_shim.sglang_config import fused_shared_experts

    with set_default_torch_dtype(mc.dtype):  # as SGLang's DefaultModelLoader.load_model does
        model = _initialize_model(mc, lc, qc)
    methods = {n: [type(m.quant_method).__name__, type(getattr(m, "scheme", None)).__name__]
               for n, m in model.named_modules() if getattr(m, "quant_method", None) is not None}
    # FusedMoE runner configs: [experts the layer routes over, experts it holds]
    moe = {n: [m.moe_runner_config.num_experts, m.moe_runner_config.num_local_experts]
           for n, m in model.named_modules() if hasattr(m, "moe_runner_config")}
    fused = fused_shared_experts(model)
    # mark every parameter's bytes first: a parameter SGLang's loader skips (e.g. a renamed scale) keeps the mark
    for p in model.parameters():
        p.data.view(torch.uint8).fill_(MARK)
    model.load_weights(weights())
    params = {n: [str(p.dtype), list(p.shape), sha(p)] for n, p in model.named_parameters()}
    untouched = sorted(n for n, p in model.named_parameters()
                       if p.numel() and bool((p.data.view(torch.uint8) == MARK).all()) and not n.endswith(DERIVED))
    return {"methods": methods, "moe": moe, "fused_shared": fused, "params": params, "untouched": untouched}


def _has_mtp_layer(hf_config, path: str) -> bool:
    """Whether SGLang would build a NextN draft from this directory (DeepSeek-V3 with an MTP layer) and it holds one."""
    from mpconvert.layout import mtp_layer

    if hf_config.architectures[0] not in ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM"):
        return False
    if not getattr(hf_config, "num_nextn_predict_layers", 0) or hf_config.num_hidden_layers == 1:
        return False
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"]
    return any(k.startswith(f"model.layers.{mtp_layer(hf_config.num_hidden_layers)}.") for k in index)


def _checkpoint_name(name: str, num_hidden_layers: int) -> str:
    from mpconvert.layout import from_nextn_draft

    module, dot, leaf = name.rpartition(".")
    return from_nextn_draft(module, num_hidden_layers) + dot + leaf if name.startswith("model.") else name


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:6]))
