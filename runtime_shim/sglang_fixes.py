"""Corrections of SGLang 0.5.17 bugs that make a layer the shim binds compute wrong numbers without any error.

GPTQ-Marlin MoE under tensor parallelism (sgl-project/sglang#36822; fixes proposed in sglang#19938, #35955 and, for
the second, vllm#50196), found by the GPU run's per-layer check (gpu/driver.py: a model with GPTQ expert groups was
0.45–0.60 off its dequantized reference per MoE layer at TP=2, against 0.024–0.034 at TP=1; served by SGLang alone,
the GPTQ MoE source gives NaN at TP=2):

1. Without act-order, create_weights sizes w2_scales / w2_qzeros for the whole intermediate dimension instead of
   this rank's part (the desc_act condition is reversed). The loader writes the rank's groups into the first rows
   and leaves the rest uninitialized; the kernel derives the group size from the row count and reads them. Fixed by
   sizing them to the rank's groups (as vLLM does) before loading.
2. process_weights_after_loading permutes w13_scales for the Marlin layout with K = the intermediate size per
   partition, but w13's K is the hidden size: where the two fall on different sides of the group size, the scales
   get the single-group permutation although they have several groups. Fixed by showing it the right K.

The first checks for the bug's signature and does nothing without it; the second changes only what 0.5.17's method
reads, for the length of that call.
"""
from __future__ import annotations

import torch

GPTQ_MOE = "GPTQMarlinMoEMethod"


def patch_gptq_marlin_moe(method):
    """Correct a GPTQ-Marlin MoE method before its layer calls create_weights (a layer the shim binds directly).
    The method keeps its class: it is still SGLang's native one."""
    if type(method).__name__ != GPTQ_MOE:
        return method
    create = method.create_weights

    def create_weights(layer, *args, **kwargs):
        create(layer, *args, **kwargs)
        _w2_groups_of_this_rank(layer, method.quant_config)

    method.create_weights = create_weights
    _patch_processing(method)
    return method


def correct_built_gptq_marlin_moe(layer) -> None:
    """The same corrections for a FusedMoE already constructed (its weights created, not loaded): the shim's own
    expert-group layers."""
    method = getattr(layer, "quant_method", None)
    if type(method).__name__ == GPTQ_MOE:
        _w2_groups_of_this_rank(layer, method.quant_config)
        _patch_processing(method)


def _w2_groups_of_this_rank(layer, qc) -> None:
    if qc.desc_act or qc.group_size == -1 or layer.moe_tp_size == 1:
        return
    want = int(layer.w2_qweight.shape[1] * qc.pack_factor) // qc.group_size  # this rank's K of down_proj, in groups
    for name in ("w2_scales", "w2_qzeros"):
        old = getattr(layer, name)
        if old.shape[1] == want:
            continue  # a SGLang that sizes them right
        new = torch.nn.Parameter(torch.empty(old.shape[0], want, old.shape[2], dtype=old.dtype, device=old.device),
                                 requires_grad=False)
        new.__dict__.update(old.__dict__)  # weight_loader, quant_method, is_transposed, load_full_w2
        layer.register_parameter(name, new)


def _patch_processing(method) -> None:
    process = method.process_weights_after_loading

    def process_weights_after_loading(layer):
        # w13's K (the hidden size) is what its scale permutation needs; SGLang reads intermediate_size_per_partition
        # there and nowhere else in this method, so it sees the right K for the duration of the call
        k13 = int(layer.w13_qweight.shape[1] * method.quant_config.pack_factor)
        saved = layer.intermediate_size_per_partition
        layer.intermediate_size_per_partition = k13
        try:
            process(layer)
        finally:
            layer.intermediate_size_per_partition = saved

    method.process_weights_after_loading = process_weights_after_loading
