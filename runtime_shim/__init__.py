"""SGLang runtime shim: lets SGLang serve an mpconvert directory on its own native kernels.

`register()` is the `sglang.srt.plugins` entry point (SGLang loads plugins in every spawned worker). It adds the
`mpconvert` quantization method, whose config reads the directory's manifest and hands each layer to SGLang's own
config for its format (built with that config's `from_config`). engine_check.py builds and loads a directory's model on
CPU through it (what `mpconvert verify --engine sglang` runs).
"""


def register() -> None:
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    from .sglang_config import MpconvertConfig
    from .sglang_versions import warn_if_untested

    warn_if_untested()  # one loud warning in every process of an SGLang version nobody tested

    QUANTIZATION_METHODS[MpconvertConfig.get_name()] = MpconvertConfig  # mutate in place: others import the dict
