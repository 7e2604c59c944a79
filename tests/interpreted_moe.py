"""The shim's shared Triton sequence for mixed experts, computed on the CPU: SGLang's real fused-MoE sequence and
Triton kernels (`_fused_moe_kernel_sequence`, `invoke_fused_moe_kernel`, its top-k sum) run under Triton's interpreter
(TRITON_INTERPRET=1, set by the caller before anything imports triton).

Run by tests/test_mixed_experts.py in a subprocess; prints one JSON line. What it shows: groups of one format in the
shared sequence compute exactly what SGLang's plain layer computes, with and without expert parallelism's -1 slots;
the block tables each group reads (the shim's own small Triton kernel).
What the interpreter cannot run, the GPU run shows (docs/gpu-results.md §8): bfloat16 (numpy has none; SGLang's own
plain sequence gives garbage there, float16 is right), Int8 activations (their quantization calls CUDA's libdevice),
FP8 (wrong numbers in the interpreter) — so several formats in one sequence.

Two stand-ins for what a CPU lacks, neither in the code under test: SGLang's expert alignment is a CUDA kernel
(sgl_kernel), replaced by `align` below, which sorts the same way its docstring specifies (-1 slots into a block of
their own); the GPU's name for the kernel-config lookup is given as the H200 we serve on.
"""
import json
import os
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
os.environ.setdefault("SGLANG_NCCL_SO_PATH", "/nonexistent/libnccl.so")  # no NCCL here: SGLang's gloo-only path

import torch  # noqa: E402

E, H, I, M, K = 8, 64, 32, 6, 2  # experts on the rank, hidden, moe intermediate, tokens, top-k


def sglang_context():
    """What the sequence reads from a running server: its arguments, a (one-rank, gloo) TP group, the GPU's name."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe, fused_moe_triton_config
    from sglang.srt.server_args import ServerArgs
    from transformers import Qwen3MoeConfig

    from mpconvert.engine import rendezvous
    from mpconvert.runtime_shim.sglang_versions import init_rank

    model = tempfile.mkdtemp()
    Qwen3MoeConfig(hidden_size=H, intermediate_size=2 * H, moe_intermediate_size=I, num_experts=E,
                   num_experts_per_tok=K, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=32, vocab_size=128, architectures=["Qwen3MoeForCausalLM"]).save_pretrained(model)
    init_rank(ServerArgs(model_path=model, device="cpu"), 1, 0, 1, rendezvous(Path(model)))
    fused_moe_triton_config.get_device_name = lambda: "NVIDIA H200"
    fused_moe.moe_align_block_size = align


def align(topk_ids, block_size, num_experts, ignore_invalid_expert=False):
    """SGLang's moe_align_block_size: slot ids sorted by expert (-1, another rank's, first), each expert's run padded
    to whole blocks with the id numel; the expert of each block; the padded count."""
    ids = topk_ids.flatten().tolist()
    slots, blocks = [], []
    for e in (-1, *range(num_experts)):
        mine = [i for i, x in enumerate(ids) if x == e]
        padded = -(-len(mine) // block_size) * block_size
        slots += mine + [len(ids)] * (padded - len(mine))
        blocks += [e] * (padded // block_size)
    return (torch.tensor(slots, dtype=torch.int32), torch.tensor(blocks, dtype=torch.int32),
            torch.tensor([len(slots)], dtype=torch.int32))


def runner_config(num_experts: int, local: int):
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig

    return MoeRunnerConfig(num_experts=num_experts, num_local_experts=local, hidden_size=H,
                           intermediate_size_per_partition=I, top_k=K, params_dtype=torch.float16, inplace=False)


def plain(info, x, weights, ids, num_experts: int):
    """SGLang's own path for one FusedMoE holding the info's experts: its pre-permute (alignment) and sequence."""
    from sglang.srt.layers.moe.moe_runner.triton import TritonRunnerCore, pre_permute_standard_to_triton
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatchOutput
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    cfg, state = runner_config(num_experts, info.w13_weight.shape[0]), {}
    d = StandardDispatchOutput(hidden_states=x, hidden_states_scale=None,
                               topk_output=StandardTopKOutput(weights, ids, None))
    return TritonRunnerCore(cfg).run(pre_permute_standard_to_triton(d, info, cfg, state), info, state).hidden_states


def shared(groups, infos, x, weights, ids, num_experts: int):
    """The shim's path: the groups (expert lists, the lead first) in one sequence."""
    from sglang.srt.layers.moe.moe_runner.triton import TritonRunnerCore

    from mpconvert.runtime_shim.mixed_experts import local_id_table, run_triton_groups

    maps = torch.stack([local_id_table(g, 0, E) for g in groups])
    return run_triton_groups(TritonRunnerCore(runner_config(num_experts, len(groups[0]))), infos, maps, x, weights,
                             ids)


def fp16(w13, w2, experts):
    from sglang.srt.layers.moe.moe_runner.triton import TritonMoeQuantInfo

    return TritonMoeQuantInfo(w13_weight=w13[experts], w2_weight=w2[experts])


def reference(w13, w2, x, weights, ids):
    """The MoE in float32 from the given weights; -1 slots add nothing."""
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(K):
            e = int(ids[t, k])
            if e >= 0:
                h = w13[e].float() @ x[t].float()
                out[t] += weights[t, k] * (w2[e].float() @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    return out


def main():
    sglang_context()
    torch.manual_seed(0)
    w13, w2 = (torch.randn(E, 2 * I, H) / 8).half(), (torch.randn(E, H, I) / 6).half()
    x = torch.randn(M, H).half()
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(M)]).int()
    weights = torch.softmax(torch.randn(M, K), -1)
    a, b, c = [0, 2, 3, 5, 7], [1, 4], [6]
    result = {}

    whole = plain(fp16(w13, w2, list(range(E))), x, weights, ids, E)
    result["plain_vs_reference"] = (whole.float() - reference(w13, w2, x, weights, ids)).abs().max().item()
    for name, groups in (("two", [a, b + c]), ("three", [a, b, c])):
        out = shared(groups, [fp16(w13, w2, g) for g in groups], x, weights, ids, E)
        result[f"{name}_groups_equal_plain"] = torch.equal(out, whole)

    # expert parallelism: the slots of experts on another rank come as -1 (this rank holds E of 2E experts)
    ep_ids = torch.where(torch.arange(M * K).view(M, K) % 3 == 0, -1, ids)
    ep_whole = plain(fp16(w13, w2, list(range(E))), x, weights, ep_ids, 2 * E)
    ep = shared([a, b + c], [fp16(w13, w2, g) for g in (a, b + c)], x, weights, ep_ids, 2 * E)
    result["ep_equal_plain"] = torch.equal(ep, ep_whole)
    result["ep_differs_from_all_slots"] = not torch.equal(ep_whole, whole)

    # the block tables alone: a rank holding 6 experts, group A holds 1 and 4 (its 0, 1), group B 0, 2, 3, 5; the
    # alignment's blocks name rank-local experts, -1 (another rank's), and past the padded count anything at all
    from mpconvert.runtime_shim.mixed_experts import group_block_experts

    maps = torch.tensor([[-1, 0, -1, -1, 1, -1, -1], [0, -1, 1, 2, -1, 3, -1]], dtype=torch.int32)
    blocks = torch.tensor([0, 1, 1, 2, 3, 4, 5, -1, 123456, -9], dtype=torch.int32)
    local, every_token = group_block_experts(maps, blocks, 3)
    result["block_tables"] = local.tolist()
    result["block_tables_contiguous"] = all(row.is_contiguous() for row in local)  # each: a kernel's expert_ids
    result["every_token"] = every_token.tolist()
    result["output_scale"] = whole.float().abs().mean().item()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
