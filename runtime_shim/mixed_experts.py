"""Expert-level mixed precision: one MoE layer whose experts come in several formats, served on native kernels.

SGLang's FusedMoE holds one format per layer. For a layer the manifest lists as `mixed_experts`, the layer's quant
method is `MixedExpertsMethod`: it builds one real FusedMoE per format group (named `expert_groups.N` under the
layer), each holding only its own experts and bound by its native config to its native method (checked like any
other layer). The model's router is untouched: top-k, renormalization and shared experts run exactly as the model
defines them. In the forward, each group gets the same tokens and top-k weights with the top-k ids mapped to its own
local ids; the partial outputs are summed (a sum over top-k slots, as inside one kernel). Slots routed to other
groups' experts are dropped in one of two ways:
- Triton MoE runner (FP8, Int8, bf16): id -1, the sentinel SGLang's expert parallelism uses for experts on other
  ranks. The runner skips -1 blocks only when its config says the layer has more experts than are local
  (`num_experts != num_local_experts`), so the group's runner config gets the layer's expert count. The group
  computes only its experts' share.
- Marlin MoE (GPTQ): SGLang's GPTQ-Marlin MoE passes the kernel no expert map, so -1 is not known to be skipped
  there. Such slots go to the group's first expert with weight 0: exact (a zero-weighted expert adds nothing), at the
  cost of computing those slots once more in that group.

Kernel configs: SGLang picks a Triton fused-MoE kernel config by the layer's expert count (tuned files such as
`E=128,N=768,device_name=NVIDIA_H200,…`), so a group of 16 or 112 experts would find none and run the untuned
default. Each expert of a group sees the same tokens as in the plain layer, so a group runs the config the plain layer
would: its lookup is made with the layer's expert count on this rank (`layer_kernel_config`).

Weight loading: the model's loader maps `experts.N.gate_proj.*` to `experts.w13_*` and calls that parameter's
weight_loader with the global expert id. The layer holds one empty routing parameter per native name (`w13_weight`,
`w13_qweight`, …); its loader hands the tensor to the owning group's real parameter with the group-local expert id.

Expert parallelism (standard dispatcher): each rank builds the groups that have experts in its contiguous range, each
holding just those; the dispatcher's rank-local ids map through the same tables (its -1 stays -1).

Limits (refused at load time, naming the layer): shared experts fused into the FusedMoE, and a --moe-runner-backend
other than the default (auto/triton).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase, QuantizationConfig

from mpconvert.formats import FORMATS
from mpconvert.manifest import EXPERT_GROUPS as GROUPS
from mpconvert.runtime_shim.sglang_fixes import correct_built_gptq_marlin_moe


class MixedExpertsMethod(FusedMoEMethodBase):
    def __init__(self, prefix: str, groups: list[tuple[dict, Optional[QuantizationConfig]]],
                 check: Callable[[torch.nn.Module, str, dict, object], None]):
        self.prefix = prefix
        self.groups = groups  # (manifest group {format, params, experts}, native config or None for bf16)
        self.check = check  # the shim's native-method check, applied to every group layer

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra):
        from sglang.srt.layers.moe import get_moe_runner_backend

        backend = get_moe_runner_backend()
        if not (backend.is_auto() or backend.is_triton()):
            raise ValueError(f"mpconvert: {self.prefix} mixes formats across its experts, which mpconvert serves on "
                             f"SGLang's default MoE runners (Triton, Marlin); drop --moe-runner-backend "
                             f"{backend.value}")
        if layer.num_fused_shared_experts:
            raise ValueError(f"mpconvert: {self.prefix} mixes formats across its experts and SGLang fused shared "
                             f"experts into it; serve with --disable-shared-experts-fusion")
        # Expert parallelism: this rank holds the contiguous range SGLang gives it, and its dispatcher hands the
        # layer rank-local top-k ids (-1 for experts on other ranks). Each group holds its experts in that range.
        per_rank = layer.num_experts // layer.moe_ep_size
        lo = layer.moe_ep_rank * per_rank
        self.layer_experts = per_rank  # what the plain layer would hold: its kernel-config lookup key
        _install_layer_config_lookup()
        self.owner: dict[int, tuple[str, int]] = {}  # global expert id on this rank → (group key, loader expert id)
        self.every = {e for spec, _ in self.groups for e in spec["experts"]}
        self.drops_minus_one: dict[str, bool] = {}
        groups = torch.nn.ModuleDict()
        for g, (spec, native) in enumerate(self.groups):
            mine = [e for e in spec["experts"] if lo <= e < lo + per_rank]
            if mine:
                groups[str(g)] = self._group(layer, g, spec, native, mine, lo, per_rank, hidden_size,
                                             intermediate_size_per_partition, params_dtype)
        layer.add_module(GROUPS, groups)
        for name in sorted({n for sub in groups.values() for n, _ in sub.named_parameters(recurse=False)}):
            proxy = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            proxy.weight_loader = self._router(layer, name)
            layer.register_parameter(name, proxy)

    def _group(self, layer, g: int, spec: dict, native, mine: list[int], lo: int, per_rank: int, hidden_size: int,
               intermediate_size_per_partition: int, params_dtype):
        """The FusedMoE of one format group: exactly this rank's experts of the group, on its native method."""
        from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

        cfg, ep = layer.moe_runner_config, layer.moe_ep_size
        # SGLang splits a FusedMoE's experts evenly over the EP ranks: declaring ep × len(mine) experts makes this
        # rank hold len(mine); its loader takes them as ids rank·len(mine) + i (its own contiguous range)
        sub = FusedMoE(num_experts=len(mine) * ep, hidden_size=hidden_size,
                       intermediate_size=intermediate_size_per_partition * layer.moe_tp_size,
                       layer_id=layer.layer_id, top_k=layer.top_k, params_dtype=params_dtype,
                       reduce_results=False, quant_config=native, prefix=self.prefix,
                       activation=cfg.activation, apply_router_weight_on_input=cfg.apply_router_weight_on_input,
                       inplace=False,  # every group reads the same input
                       no_combine=cfg.no_combine, routed_scaling_factor=cfg.routed_scaling_factor,
                       gemm1_alpha=cfg.gemm1_alpha, gemm1_clamp_limit=cfg.gemm1_clamp_limit,
                       swiglu_limit=cfg.swiglu_limit, with_bias=layer.with_bias,
                       routing_method_type=cfg.routing_method_type, is_gated=cfg.is_gated,
                       gate_up_interleaved=cfg.gate_up_interleaved)
        self.check(sub, f"{self.prefix} experts {spec['experts']}", spec, sub.quant_method)
        correct_built_gptq_marlin_moe(sub)  # SGLang 0.5.17's GPTQ-Marlin MoE under TP (sglang_fixes.py)
        key = str(g)
        self.drops_minus_one[key] = FORMATS[spec["format"]].sglang_moe_runner == "triton"
        if self.drops_minus_one[key]:
            # its runner (which holds this same config object) now drops -1 slots (see the module docstring)
            sub.moe_runner_config.num_experts = layer.num_experts
        # rank-local top-k id → this group's local id; -1 for other groups' experts, and the extra last entry maps
        # the dispatcher's -1 (an expert on another rank) to -1 as well
        local = torch.full((per_rank + 1,), -1, dtype=torch.int32)
        for i, e in enumerate(mine):
            local[e - lo] = i
            self.owner[e] = (key, layer.moe_ep_rank * len(mine) + i)
        layer.register_buffer(f"expert_map_{g}", local, persistent=False)
        return sub

    def _router(self, layer, name: str):
        def load(_proxy, loaded_weight, weight_name, shard_id=None, expert_id=None):
            if expert_id not in self.every:
                raise ValueError(f"mpconvert: {weight_name}: expert {expert_id} is in no expert group of "
                                 f"{self.prefix} (the manifest lists {sorted(self.every)})")
            if expert_id not in self.owner:
                return  # held by another expert-parallel rank, as FusedMoE's own loader skips it
            key, loader_id = self.owner[expert_id]
            sub = getattr(layer, GROUPS)[key]
            real = sub._parameters.get(name)
            if real is None:
                spec = self.groups[int(key)][0]
                raise ValueError(f"mpconvert: {weight_name}: expert {expert_id} of {self.prefix} is "
                                 f"{spec['format']}, which has no {name}; the checkpoint and its manifest disagree — "
                                 f"run mpconvert verify")
            real.weight_loader(real, loaded_weight, weight_name, shard_id=shard_id, expert_id=loader_id)
        return load

    def create_moe_runner(self, layer, moe_runner_config):
        pass  # each group layer built its own runner

    def process_weights_after_loading(self, layer):
        pass  # SGLang's loader walks every module: the group layers are processed by their own native methods

    def apply(self, layer, dispatch_output):
        from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

        # The groups run one after another. Side streams (as SGLang runs Qwen2-MoE's shared expert) gained nothing:
        # each group's Triton GEMMs launch a grid over all of its possible expert blocks, which fills the GPU, and a
        # block timed alone in a CUDA graph was as fast or faster in sequence (gpu/results/…-speed-4b).
        out = None
        for key, sub in getattr(layer, GROUPS).items():
            part = self._apply_group(layer, key, sub, dispatch_output)
            out = part if out is None else out.add_(part)
        return StandardCombineInput(hidden_states=out)

    def _apply_group(self, layer, key: str, sub, dispatch_output):
        """One group's native fused-MoE call on the layer's tokens, restricted to its own experts."""
        topk = dispatch_output.topk_output
        local_ids = getattr(layer, f"expert_map_{key}")[topk.topk_ids]
        if self.drops_minus_one[key]:
            mine = topk._replace(topk_ids=local_ids)
        else:  # first local expert, weight 0
            keep = local_ids >= 0
            mine = topk._replace(topk_ids=local_ids.clamp(min=0),
                                 topk_weights=topk.topk_weights * keep.to(topk.topk_weights.dtype))
        with layer_kernel_config(self.layer_experts):
            return sub.quant_method.apply(sub, dispatch_output._replace(
                topk_output=mine, hidden_states_pre_quant=None)).hidden_states


_LAYER_EXPERTS: list[int] = []  # innermost layer_kernel_config's expert count


@contextmanager
def layer_kernel_config(num_experts: int):
    """Within: SGLang's Triton fused-MoE config lookups are made as for a layer of num_experts experts (the group's
    weights keep their own shapes; only the lookup key changes). Config lookups run in Python, also while CUDA graphs
    are captured, so the config is fixed into the graph."""
    _LAYER_EXPERTS.append(num_experts)
    try:
        yield
    finally:
        _LAYER_EXPERTS.pop()


def _install_layer_config_lookup():
    """Wrap the lookup SGLang's Triton runner calls (fused_moe.try_get_optimal_moe_config, called once per forward
    with the weights' shapes) so that layer_kernel_config can give it the layer's expert count. Outside
    layer_kernel_config it is SGLang's own lookup, unchanged."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe

    lookup = fused_moe.try_get_optimal_moe_config
    if getattr(lookup, "mpconvert_layer_lookup", False):
        return

    def as_layer(w1_shape, w2_shape, *args, **kwargs):
        if _LAYER_EXPERTS:
            e = _LAYER_EXPERTS[-1]
            w1_shape, w2_shape = (e, *w1_shape[1:]), (e, *w2_shape[1:])
        return lookup(w1_shape, w2_shape, *args, **kwargs)

    as_layer.mpconvert_layer_lookup = True
    fused_moe.try_get_optimal_moe_config = as_layer
