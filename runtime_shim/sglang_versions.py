"""The SGLang versions mpconvert is tested on, and what differs between them — in this one place.

Tested: 0.5.17 (CPU tests and GPU runs) and 0.5.23 (CPU tests; see README's version table). Differences handled:
- bringing up a rank's parallel state (engine_check's harness): 0.5.17 takes the sizes as arguments of
  initialize_model_parallel and reads the server args from a global; 0.5.23 publishes a runtime context from the
  server args and the rank's placement first, and initialize_model_parallel reads the sizes from it.
- the fused-MoE preparation the mixed-experts sequence reuses: 0.5.23 also decides TMA for the up projection (one
  more value returned, one more runner state key).
- where launch_server's --config merger lives (launch_arguments): sglang.srt.server_args_config_parser in 0.5.17,
  sglang.srt.utils.server_args_config_parser in 0.5.23.
An untested version gets one loud warning at registration; mixed-format experts, which lean on SGLang's private
fused-MoE internals, are refused there (runtime_shim.mixed_experts asks `tested()`).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import warnings
from typing import Callable, NoReturn

TESTED = ("0.5.17", "0.5.23")
CHECK = "mpconvert verify DIR --engine sglang"

logger = logging.getLogger("mpconvert")


def version() -> str:
    import sglang

    return getattr(sglang, "__version__", "unknown")


def tested() -> bool:
    return version() in TESTED


def untested_message() -> str:
    return (f"mpconvert's SGLang shim is tested with SGLang {' and '.join(TESTED)}, not {version()}: it may bind "
            f"layers wrongly; run `{CHECK}` on your directory to check what this version does with it")


def warn_if_untested() -> None:
    if not tested():
        logger.warning(untested_message())
        warnings.warn(untested_message(), RuntimeWarning, stacklevel=2)


def init_rank(server_args, tp: int, rank: int, ep: int, init_method: str):
    """This process as rank `rank` of TP=tp (EP=ep) on gloo (meeting the others at init_method, torch's URL), SGLang's
    parallel groups and DP-attention state set up; returns the ModelConfig (what engine_check's harness needs before
    building a model)."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.dp_attention import initialize_dp_attention

    sizes_as_arguments = "tensor_model_parallel_size" in inspect.signature(initialize_model_parallel).parameters
    if sizes_as_arguments:  # 0.5.17
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(server_args)
    else:  # 0.5.23: the topology is published before any group is built
        from sglang.srt.runtime_context import SpawnRanks, publish

        publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=rank, gpu_id=None))
    init_distributed_environment(backend="gloo", world_size=tp, rank=rank, local_rank=rank,
                                 distributed_init_method=init_method)
    if sizes_as_arguments:
        initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    else:
        initialize_model_parallel()
    model_config = ModelConfig.from_server_args(server_args)
    if sizes_as_arguments:
        initialize_dp_attention(server_args, model_config)
    else:
        initialize_dp_attention(server_args)
    return model_config


def prepare_fused_moe_run(*args, **kwargs):
    """SGLang's _prepare_fused_moe_run, normalized: (config, down_config, the runner state's TMA flags,
    sorted_token_ids, expert_ids, num_tokens_post_padded)."""
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import _prepare_fused_moe_run

    out = _prepare_fused_moe_run(*args, **kwargs)
    if len(out) == 6:  # 0.5.17
        config, down_config, down_tma, sorted_ids, expert_ids, padded = out
        return config, down_config, {"down_moe_use_tma": down_tma}, sorted_ids, expert_ids, padded
    config, down_config, down_tma, up_tma, sorted_ids, expert_ids, padded = out  # 0.5.23
    return config, down_config, {"down_moe_use_tma": down_tma, "up_moe_use_tma": up_tma}, sorted_ids, expert_ids, \
        padded


def launch_arguments(argv: list[str], error: Callable[[str], NoReturn]) -> argparse.Namespace:
    """argv as `python -m sglang.launch_server` reads it — its prepare_server_args up to the parse, without building
    ServerArgs (whose __post_init__ probes the GPUs): SGLang's own parser (its aliases and abbreviations), a --config
    file merged into argv first; what SGLang does not know is left to it. `error(message)` is called where argparse
    would print its usage and exit."""
    from sglang.srt.server_args import ServerArgs

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            error(message)

    parser = Parser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    if "--config" in argv:
        try:
            from sglang.srt.server_args_config_parser import ConfigArgumentMerger  # 0.5.17
        except ImportError:
            from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger  # 0.5.23
        argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
    return parser.parse_known_args(argv)[0]
