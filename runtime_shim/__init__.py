"""SGLang runtime shim: lets SGLang serve an mpconvert directory on its own native kernels.

`register()` is the `sglang.srt.plugins` entry point (SGLang loads plugins in every spawned worker). It adds the
`mpconvert` quantization method, whose config reads the directory's manifest and hands each layer to SGLang's own
config for its format (built with that config's `from_config`). engine_check.py builds and loads a directory's model on
CPU through it (what `mpconvert verify --engine sglang` runs).
"""


import logging

# SGLang's ModelConfig warns "<method> quantization is not fully optimized yet. The speed can be slower than
# non-quantized models" for every method outside a list written into the function (_verify_quantization). For
# mpconvert it is false: the shim binds each layer to the native method of its format (fp8, gptq_marlin, awq_marlin,
# w8a8_int8, compressed-tensors, all on that list) and refuses a model where SGLang would pick any other; a mixed
# model decoded faster than the blend of its sources on the GPU (docs/gpu-results.md §3).
NOT_OPTIMIZED = "%s quantization is not fully optimized yet"


class _NativeKernelsOnly(logging.Filter):
    """Drops that one warning for mpconvert; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        from mpconvert.manifest import QUANT_METHOD

        mine = isinstance(record.msg, str) and record.msg.startswith(NOT_OPTIMIZED)
        return not (mine and bool(record.args) and record.args[0] == QUANT_METHOD)


def register() -> None:
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    from .sglang_config import MpconvertConfig
    from .sglang_versions import warn_if_untested

    warn_if_untested()  # one loud warning in every process of an SGLang version nobody tested

    QUANTIZATION_METHODS[MpconvertConfig.get_name()] = MpconvertConfig  # mutate in place: others import the dict
    _check_models_once_built()
    model_config_log = logging.getLogger("sglang.srt.configs.model_config")
    if not any(isinstance(f, _NativeKernelsOnly) for f in model_config_log.filters):
        model_config_log.addFilter(_NativeKernelsOnly())


def _check_models_once_built() -> None:
    """Every SGLang model loader builds its model through loader._initialize_model (looked up at call time): wrapped
    once, so that a model built with the mpconvert config is checked (MpconvertConfig.check_bound) before any weight
    is loaded."""
    from sglang.srt.model_loader import loader

    from .sglang_config import MpconvertConfig

    initialize = loader._initialize_model
    if getattr(initialize, "mpconvert_checked", False):
        return

    def _initialize_model(model_config, load_config, quant_config=None, *args, **kwargs):
        model = initialize(model_config, load_config, quant_config, *args, **kwargs)
        if isinstance(quant_config, MpconvertConfig):
            quant_config.check_bound(model)
        return model

    _initialize_model.mpconvert_checked = True
    loader._initialize_model = _initialize_model


def load_problem() -> str | None:
    """Why SGLang, started in this Python, would not have the mpconvert quantization method — its plugin entry point
    missing (mpconvert not installed as a package here), or the shim failing to import against this SGLang — or None.
    SGLang logs a plugin that fails and goes on, and each worker then fails with only "Unknown quantization method:
    mpconvert"; serve and verify --engine ask this first and say the cause."""
    from importlib.metadata import entry_points

    from .sglang_versions import TESTED, version

    if not [e for e in entry_points(group="sglang.srt.plugins") if e.name == "mpconvert"]:
        return ("mpconvert's sglang.srt.plugins entry point is not installed in this Python, so SGLang cannot find "
                "the runtime shim; install mpconvert here (make setup, or pip install -e .)")
    try:
        register()
    except Exception as e:  # noqa: BLE001 — any import or attribute error of a changed SGLang
        return (f"the runtime shim cannot load in SGLang {version()} ({type(e).__name__}: {' '.join(str(e).split())}); "
                f"use a tested SGLang ({' or '.join(TESTED)})")
    return None
