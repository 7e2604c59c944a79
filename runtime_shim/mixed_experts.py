"""Expert-level mixed precision: one MoE layer whose experts come in several formats, served on native kernels.

SGLang's FusedMoE holds one format per layer. For a layer the manifest lists as `mixed_experts`, the layer's quant
method is `MixedExpertsMethod`: it builds one real FusedMoE per format group (named `expert_groups.N` under the
layer), each holding only its own experts and bound by its native config to its native method (checked like any
other layer). The model's router is untouched: top-k, renormalization and shared experts run exactly as the model
defines them. Every top-k slot belongs to exactly one group; the forward computes each slot with its group's native
kernel and sums the slots as the plain layer does.

Triton groups (FP8, Int8, bf16) share ONE native fused-MoE sequence, SGLang's own (`_fused_moe_kernel_sequence`, run
by the lead group's TritonRunnerCore): one alignment of the layer's top-k ids, one activation, one top-k sum. Inside
it each group's GEMM is SGLang's `invoke_fused_moe_kernel` with the group's weights, scales and flags (built by the
group's own native method, whose runner is tapped to hand them over: `_QuantInfoTap`):
- The alignment sorts the slots into blocks of one layer expert each. A per-group table maps each block's expert to
  the group's own id, or to -1 for another group's (or another rank's) expert: the sentinel SGLang's expert
  parallelism uses, whose blocks the kernel skips (the group's runner config gets the layer's expert count, which is
  what turns that filter on).
- The lead group (the one with the most experts here) runs the sequence: its gate-up and down GEMMs write their rows
  and zeros in every other row. The other groups' GEMMs run in the sequence's hooks (the contract SGLang's MoE LoRA
  uses) and add their rows onto those zeros (FUSE_ADD_TO_OUTPUT): exact. A layer of one format split into two groups
  therefore computes what the plain layer does, bit for bit.
- Kernel configs are SGLang's tuned ones for the whole layer (the same tokens per expert as the plain layer; a group's
  own expert count, 16 or 112, would find no tuned file): the alignment and lookups use this rank's layer expert
  count. The groups share the lead's BLOCK_SIZE_M, the alignment's block.
- The block tables of all groups (and the add mask) come from one small Triton kernel of the shim's
  (`group_block_experts`): glue, not a GEMM; in torch ops it was three kernels.
So a second Triton group costs its two GEMM launches, its activation quantization, and the one glue kernel for all
groups — not a second chain.

Marlin groups (GPTQ): SGLang's GPTQ-Marlin MoE passes the kernel no expert map, so -1 is not known to be skipped
there. Each runs its own native call, with other groups' slots sent to its first expert with weight 0 (exact: a
zero-weighted expert adds nothing, at the cost of computing those slots once more), and its output is added.

Weight loading: the model's loader maps `experts.N.gate_proj.*` to `experts.w13_*` and calls that parameter's
weight_loader with the global expert id. The layer holds one empty routing parameter per native name (`w13_weight`,
`w13_qweight`, …); its loader hands the tensor to the owning group's real parameter with the group-local expert id.

Expert parallelism (standard dispatcher): each rank builds the groups that have experts in its contiguous range, each
holding just those; the dispatcher's rank-local ids map through the same tables (its -1 stays -1).

Limits (refused at load time, naming the layer and the fix): shared experts fused into the FusedMoE, a
--moe-runner-backend other than the default (auto/triton), --enable-fused-moe-sum-all-reduce, and no_combine.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase, QuantizationConfig

from mpconvert.formats import FORMATS
from mpconvert.manifest import EXPERT_GROUPS as GROUPS, ExpertGroup
from mpconvert.recipe import format_ids
from mpconvert.rules import expert_placement_problem
from mpconvert.runtime_shim.sglang_fixes import correct_built_gptq_marlin_moe


class MixedExpertsMethod(FusedMoEMethodBase):
    def __init__(self, prefix: str, groups: list[tuple[ExpertGroup, Optional[QuantizationConfig]]],
                 check: Callable[[torch.nn.Module, str, dict, object], None]):
        self.prefix = prefix
        self.groups = groups  # (the manifest's group: format, params, experts; native config or None for bf16)
        self.check = check  # the shim's native-method check, applied to every group layer

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra):
        _refuse_untested_sglang(self.prefix)
        _refuse_unsupported(self.prefix, layer)
        # Expert parallelism: this rank holds the contiguous range SGLang gives it, and its dispatcher hands the
        # layer rank-local top-k ids (-1 for experts on other ranks). Each group holds its experts in that range.
        per_rank = layer.num_experts // layer.moe_ep_size
        lo = layer.moe_ep_rank * per_rank
        self.owner: dict[int, tuple[str, int]] = {}  # global expert id on this rank → (group key, loader expert id)
        self.every = {e for spec, _ in self.groups for e in spec.experts}
        groups, local_ids, triton = torch.nn.ModuleDict(), {}, {}  # triton: key → the group's experts here
        for g, (spec, native) in enumerate(self.groups):
            mine = [e for e in spec.experts if lo <= e < lo + per_rank]
            if mine:
                on_triton = FORMATS[spec.format].sglang_moe_runner == "triton"
                groups[str(g)], local_ids[str(g)] = self._group(layer, g, spec, native, mine, lo, per_rank,
                                                                hidden_size, intermediate_size_per_partition,
                                                                params_dtype, on_triton)
                if on_triton:
                    triton[str(g)] = len(mine)
        layer.add_module(GROUPS, groups)
        # The Triton groups share one chain, led by the group with the most experts here (its kernel config's
        # BLOCK_SIZE_M sets the shared alignment's block). Their rows of one table map the alignment's block experts
        # (rank-local ids; -1, another rank's, wraps to the last column) to their own ids, -1 for other groups'.
        self.triton_keys = sorted(triton, key=lambda k: (-triton[k], int(k)))
        if self.triton_keys:
            layer.register_buffer("block_expert_maps", torch.stack([local_ids[k] for k in self.triton_keys]),
                                  persistent=False)
            self.lead_core = _tap_runner(groups[self.triton_keys[0]]).runner.runner_core
        for k in groups:
            if k not in self.triton_keys:  # a Marlin group maps the top-k ids itself
                layer.register_buffer(f"expert_map_{k}", local_ids[k], persistent=False)
        for name in sorted({n for sub in groups.values() for n, _ in sub.named_parameters(recurse=False)}):
            proxy = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            proxy.weight_loader = self._router(layer, name)
            layer.register_parameter(name, proxy)

    def _group(self, layer, g: int, spec: ExpertGroup, native, mine: list[int], lo: int, per_rank: int,
               hidden_size: int, intermediate_size_per_partition: int, params_dtype, on_triton: bool):
        """The FusedMoE of one format group: exactly this rank's experts of the group, on its native method; and its
        local_id_table. A group on SGLang's Triton runner is readied for the shared chain."""
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
        self.check(sub, f"{self.prefix} experts {format_ids(sorted(spec.experts))}", spec, sub.quant_method)
        correct_built_gptq_marlin_moe(sub)  # SGLang 0.5.17's GPTQ-Marlin MoE under TP (sglang_fixes.py)
        if on_triton:
            # its kernels (which read this same config object) now drop -1 blocks (see the module docstring), and its
            # native method now builds quant info for the chain to run
            sub.moe_runner_config.num_experts = layer.num_experts
            _tap_runner(sub)
        for i, e in enumerate(mine):
            self.owner[e] = (str(g), layer.moe_ep_rank * len(mine) + i)
        return sub, local_id_table(mine, lo, per_rank)

    def _router(self, layer, name: str):
        def load(_proxy, loaded_weight, weight_name, shard_id=None, expert_id=None):
            if expert_id not in self.every:
                raise ValueError(f"mpconvert: {weight_name}: expert {expert_id} is in no expert group of "
                                 f"{self.prefix} (the manifest lists {format_ids(sorted(self.every))})")
            if expert_id not in self.owner:
                return  # held by another expert-parallel rank, as FusedMoE's own loader skips it
            key, loader_id = self.owner[expert_id]
            sub = getattr(layer, GROUPS)[key]
            real = sub._parameters.get(name)
            if real is None:
                spec = self.groups[int(key)][0]
                raise ValueError(f"mpconvert: {weight_name}: expert {expert_id} of {self.prefix} is "
                                 f"{spec.format}, which has no {name}; the checkpoint and its manifest disagree — "
                                 f"run mpconvert verify")
            real.weight_loader(real, loaded_weight, weight_name, shard_id=shard_id, expert_id=loader_id)
        return load

    def create_moe_runner(self, layer, moe_runner_config):
        pass  # each group layer built its own runner

    def process_weights_after_loading(self, layer):
        pass  # SGLang's loader walks every module: the group layers are processed by their own native methods

    def apply(self, layer, dispatch_output):
        from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

        groups = getattr(layer, GROUPS)
        out = self._apply_triton_chain(layer, groups, dispatch_output) if self.triton_keys else None
        for key in groups:  # the Marlin groups: each its own native call, added to the output
            if key not in self.triton_keys:
                part = self._apply_marlin_group(layer, key, groups[key], dispatch_output)
                out = part if out is None else out.add_(part)
        return StandardCombineInput(hidden_states=out)

    def _apply_triton_chain(self, layer, groups, dispatch_output):
        """The Triton groups in one native sequence (run_triton_groups)."""
        topk = dispatch_output.topk_output
        plain = dispatch_output._replace(hidden_states_pre_quant=None)
        # each group's own native method builds its quant info (weights, scales, flags); its tapped runner returns it
        infos = [groups[k].quant_method.apply(groups[k], plain) for k in self.triton_keys]
        return run_triton_groups(self.lead_core, infos, layer.block_expert_maps, dispatch_output.hidden_states,
                                 topk.topk_weights, topk.topk_ids)

    def _apply_marlin_group(self, layer, key: str, sub, dispatch_output):
        """A Marlin group's native fused-MoE call on the layer's tokens: other groups' slots go to its first expert with
        weight 0."""
        topk = dispatch_output.topk_output
        local_ids = getattr(layer, f"expert_map_{key}")[topk.topk_ids]
        keep = local_ids >= 0
        mine = topk._replace(topk_ids=local_ids.clamp(min=0),
                             topk_weights=topk.topk_weights * keep.to(topk.topk_weights.dtype))
        return sub.quant_method.apply(sub, dispatch_output._replace(
            topk_output=mine, hidden_states_pre_quant=None)).hidden_states


def run_triton_groups(core, infos: list, maps: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """All Triton groups of a layer in one native fused-MoE sequence (see the module docstring): SGLang's
    _fused_moe_kernel_sequence run by the lead group's TritonRunnerCore (core) on the layer's alignment, with the other
    groups' GEMMs added in its hooks. infos: each group's TritonMoeQuantInfo, the lead's first; maps: their block
    tables (group_block_experts); topk_ids: the layer's rank-local ids."""
    from types import SimpleNamespace

    from sglang.srt.layers.moe.moe_runner.triton import TritonRunnerInput
    from mpconvert.runtime_shim.sglang_versions import prepare_fused_moe_run

    layer_experts, lead = maps.shape[1] - 1, infos[0]
    if any(getattr(info, "fuse_swiglu_interleaved", False) for info in infos):  # SGLang ≥ 0.5.23
        raise ValueError("mpconvert: a mixed-experts layer with interleaved gate/up weights fused into the activation "
                         "cannot share one sequence (the other groups' gate/up rows would miss the activation)")
    config, down_config, tma, sorted_ids, block_experts, padded = prepare_fused_moe_run(
        x, *layer_shapes(lead, layer_experts), topk_ids, **_kernel_flags(lead))
    local, every_token = group_block_experts(maps, block_experts, x.shape[0] if len(infos) > 1 else 0)
    hooks = None
    if len(infos) > 1:
        block_m = config["BLOCK_SIZE_M"]
        others = [(info, local[i], *group_configs(info, layer_experts, x, topk_ids.shape[1], block_m))
                  for i, info in enumerate(infos[1:], start=1)]
        add = _OtherGroups(others, sorted_ids, padded, core.config, x, every_token)
        hooks = SimpleNamespace(after_gate_up=add.gate_up, after_down=add.down)
    run = TritonRunnerInput(hidden_states=x, topk_weights=topk_weights, topk_ids=topk_ids,
                            sorted_token_ids=sorted_ids, expert_ids=local[0], num_tokens_post_padded=padded)
    state = {"config": config, "down_config": down_config, **tma}
    return core.run(run, lead, state, hooks=hooks).hidden_states


def layer_shapes(info, layer_experts: int):
    """A group's weight shapes as the whole layer on this rank would have them (its expert count): what SGLang aligns
    the layer's ids over and looks its tuned kernel config up by. Meta tensors: shapes only."""
    return tuple(torch.empty((layer_experts, *w.shape[1:]), dtype=w.dtype, device="meta")
                 for w in (info.w13_weight, info.w2_weight))


def group_configs(info, layer_experts: int, x: torch.Tensor, top_k: int, block_m: int) -> tuple[dict, dict]:
    """A non-lead group's kernel configs, gate-up and down: those SGLang tuned for the whole layer in the group's format
    (as _prepare_fused_moe_run finds them), on the lead's BLOCK_SIZE_M: the groups share one alignment, whose blocks
    are that many rows."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe

    w13, w2 = layer_shapes(info, layer_experts)
    flags = _kernel_flags(info)
    padding = fused_moe.padding_size  # SGLang pads per-tensor/channel FP8 and Int8 weights' K (as its own lookup)
    if not (flags["use_fp8_w8a8"] or flags["use_int8_w8a8"]) or flags["block_shape"] is not None \
            or fused_moe._use_aiter:
        padding = 0
    dtype = fused_moe.get_config_dtype_str(dtype=x.dtype, **{k: flags[k] for k in (
        "use_fp8_w8a8", "use_int8_w8a8", "use_int8_w8a16", "use_int4_w4a16")})
    config, (down, _) = fused_moe.try_get_optimal_moe_config(
        w13.shape, (*w2.shape[:2], w2.shape[2] - padding), top_k, dtype, x.shape[0],
        block_shape=flags["block_shape"], per_channel_quant=flags["per_channel_quant"], return_down_config=True)
    # TMA is the lead's choice in the shared sequence (its runner state); a group's own GEMMs run without it
    up, down = ({k: v for k, v in c.items() if k != "USE_TMA"} for c in (config, down or config))
    return {**up, "BLOCK_SIZE_M": block_m}, {**down, "BLOCK_SIZE_M": block_m}


def local_id_table(mine: list[int], lo: int, per_rank: int) -> torch.Tensor:
    """A group's id table on a rank holding experts lo … lo + per_rank - 1: rank-local expert id → the group's own
    id (its experts in manifest order), -1 for other groups' experts, and an extra last entry -1 for the dispatcher's
    -1 (an expert on another rank)."""
    table = torch.full((per_rank + 1,), -1, dtype=torch.int32)
    for i, e in enumerate(mine):
        table[e - lo] = i
    return table


def group_block_experts(maps: torch.Tensor, block_experts: torch.Tensor, num_tokens: int):
    """Each Triton group's view of the shared alignment, in one small kernel for all groups (in torch ops, a remainder,
    an index_select and a fill: 5.3 µs at batch 32 on H200, §8 of docs/gpu-results.md).

    Returns local [groups, blocks]: row i gives, for each block, group i's own id of the block's expert, or -1
    (another group's expert; the dispatcher's -1, another rank's expert). maps is [groups, layer experts + 1] with the
    -1 column last; -1 and anything outside the table (entries past the padded block count, which the kernels never
    read and SGLang leaves unset) read that column. And every_token: num_tokens True, the add mask the other groups'
    kernels take."""
    groups, columns = maps.shape
    blocks = block_experts.numel()
    local = torch.empty((groups, blocks), dtype=torch.int32, device=maps.device)
    every_token = torch.empty(num_tokens, dtype=torch.bool, device=maps.device)
    grid = (triton.cdiv(max(blocks, num_tokens, 1), _GLUE_BLOCK),)
    _group_block_experts_kernel[grid](maps, block_experts, local, every_token, blocks, num_tokens, columns,
                                      GROUPS=groups, BLOCK=_GLUE_BLOCK)
    return local, every_token


_GLUE_BLOCK = 256


@triton.jit
def _group_block_experts_kernel(maps_ptr, block_experts_ptr, local_ptr, every_token_ptr, num_blocks, num_tokens,
                                num_columns, GROUPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_blocks = offs < num_blocks
    expert = tl.load(block_experts_ptr + offs, mask=in_blocks, other=-1)
    column = tl.where((expert >= 0) & (expert < num_columns - 1), expert, num_columns - 1)
    for g in tl.static_range(GROUPS):
        own = tl.load(maps_ptr + g * num_columns + column, mask=in_blocks, other=-1)
        tl.store(local_ptr + g * num_blocks + offs, own, mask=in_blocks)
    tl.store(every_token_ptr + offs, tl.full([BLOCK], 1, tl.int1), mask=offs < num_tokens)


def _kernel_flags(info) -> dict:
    """What SGLang's Triton MoE path takes from a TritonMoeQuantInfo to pick and run its kernels."""
    return dict(use_fp8_w8a8=info.use_fp8_w8a8, use_int8_w8a8=info.use_int8_w8a8, use_int8_w8a16=info.use_int8_w8a16,
                use_int4_w4a16=info.use_int4_w4a16, per_channel_quant=info.per_channel_quant,
                block_shape=info.block_shape)


class _OtherGroups:
    """The non-lead Triton groups' GEMMs, as hooks of the lead's sequence (the contract SGLang's MoE LoRA uses):
    after the lead's gate-up GEMM and after its down GEMM, each other group's native kernel adds its experts' rows
    into the same buffer (FUSE_ADD_TO_OUTPUT). The lead's kernel wrote its rows and zeros in every other row; each row
    belongs to one group, so every add is onto zero and exact."""

    def __init__(self, others, sorted_ids, padded, cfg, x, every_token):
        self.others, self.sorted_ids, self.padded, self.cfg = others, sorted_ids, padded, cfg
        self.compute_type = tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16
        self.every_token = every_token

    def gate_up(self, hidden_states, cache1, topk_weights, topk_ids):
        top_k = topk_ids.shape[1]
        for info, experts, config, _ in self.others:
            self._add(hidden_states, info.w13_weight, info.b13, cache1.view(-1, cache1.shape[-1]), info.a13_scale,
                      info.w13_scale, info.w13_zp, topk_weights, topk_ids, experts,
                      self.cfg.apply_router_weight_on_input, top_k, config, info)

    def down(self, cache2, cache3, topk_weights, topk_ids):
        for info, experts, _, config in self.others:
            self._add(cache2, info.w2_weight, info.b2, cache3, info.a2_scale, info.w2_scale, info.w2_zp,
                      topk_weights, topk_ids, experts, not self.cfg.apply_router_weight_on_input, 1, config, info)

    def _add(self, a, w, bias, out, a_scale, w_scale, w_zp, topk_weights, topk_ids, experts, mul_routed_weight,
             top_k, config, info):
        from sglang.kernels.ops.moe.fused_moe_triton_kernels import invoke_fused_moe_kernel

        invoke_fused_moe_kernel(a, w, bias, out, a_scale, w_scale, w_zp, topk_weights, topk_ids, self.sorted_ids,
                                experts, self.padded, mul_routed_weight, top_k, config,
                                compute_type=self.compute_type, **_kernel_flags(info), filter_expert=True,
                                fuse_add_to_output=True, add_output_mask=self.every_token,
                                router_topk=topk_ids.shape[1])


def _refuse_untested_sglang(prefix: str):
    """Mixed-format experts drive SGLang's private fused-MoE internals: on a version nobody tested, refuse."""
    from mpconvert.runtime_shim.sglang_versions import tested, untested_message

    if not tested():
        raise ValueError(f"mpconvert: {prefix} mixes formats across its experts, which is served only on the tested "
                         f"SGLang versions — {untested_message()}")


def _refuse_unsupported(prefix: str, layer):
    """What a mixed layer cannot be served with, named with the fix (raised at load time)."""
    from sglang.srt.layers.moe import get_moe_runner_backend
    from sglang.srt.runtime_context import get_exec

    backend = get_moe_runner_backend()
    if not (backend.is_auto() or backend.is_triton()):
        raise ValueError(f"mpconvert: {prefix} mixes formats across its experts, which mpconvert serves on SGLang's "
                         f"default MoE runners (Triton, Marlin); drop --moe-runner-backend {backend.value}")
    if layer.num_fused_shared_experts:
        raise ValueError(f"mpconvert: {prefix} mixes formats across its experts and SGLang fused shared experts into "
                         f"it; serve with --disable-shared-experts-fusion")
    if get_exec().moe.enable_fused_moe_sum_all_reduce:
        # the down GEMM would add into the output directly, past the buffer the other groups add their rows to
        raise ValueError(f"mpconvert: {prefix} mixes formats across its experts, which its groups' shared Triton "
                         f"chain serves with SGLang's separate top-k sum; drop --enable-fused-moe-sum-all-reduce")
    moved = expert_placement_problem(prefix, get_exec().moe)
    if moved:
        raise ValueError(f"mpconvert: {moved}")
    if layer.moe_runner_config.no_combine:
        raise ValueError(f"mpconvert: {prefix} mixes formats across its experts, which mpconvert serves with the "
                         f"top-k outputs combined; SGLang asked this layer not to combine them (no_combine)")


def _tap_runner(sub) -> "_QuantInfoTap":
    """Put a _QuantInfoTap in place of the group's MoeRunner (on its method, or on its compressed-tensors scheme,
    whichever created it); idempotent: a tapped group gives its tap."""
    for holder in (sub.quant_method, getattr(sub, "scheme", None)):
        runner = getattr(holder, "runner", None)
        if isinstance(runner, _QuantInfoTap):
            return runner
        if runner is not None:
            holder.runner = _QuantInfoTap(runner)
            return holder.runner
    raise ValueError(f"mpconvert: a group of {sub.layer_name}: its native MoE method made no runner; mpconvert serves "
                     f"mixed experts on SGLang's Triton MoE runner")


class _QuantInfoTap:
    """Stands in for a Triton group's MoeRunner: the group's native method builds its TritonMoeQuantInfo and hands it
    to runner.run, which here returns it; MixedExpertsMethod runs the kernels. Everything else is the real runner's."""

    def __init__(self, runner):
        self.runner = runner

    def run(self, dispatch_output, quant_info, *args, **kwargs):
        return quant_info

    def __getattr__(self, name):
        return getattr(self.runner, name)
