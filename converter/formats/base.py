"""The contract every format module fulfils; build, verify and the runtime shim use only this.

A *scheme* is (format name, params). Params are plain JSON values and go verbatim into the manifest. A format owns:
which tensor suffixes a module has, their dtypes/shapes (invariants), a reference dequantizer, how TP may split it,
and any exact rewrite of stored bytes (e.g. GPTQ v2 → v1 zero points).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError

FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class Scheme:
    format: str
    params_json: str  # canonical JSON: hashable and comparable

    @classmethod
    def of(cls, fmt: str, **params: Any) -> "Scheme":
        return cls(fmt, json.dumps(params, sort_keys=True))

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    def describe(self) -> str:
        p = self.params
        return FORMATS[self.format].describe(p)


@dataclass(frozen=True)
class Expect:
    """What one tensor of a module must look like. dtypes: allowed safetensors dtypes."""

    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    alt_shapes: tuple[tuple[int, ...], ...] = ()  # other accepted shapes (e.g. a scalar scale as [] or [1])

    def accepts(self, dtype: str, shape) -> bool:
        return dtype in self.dtypes and (tuple(shape) == self.shape or tuple(shape) in self.alt_shapes)


class Format:
    name: str = ""
    # True where the producer folds activation scales into the previous op (norms, v_proj→o_proj, up→down),
    # which couples modules across sources (layout.py)
    folds_scales: bool = False
    # SGLang 0.5.17's runner for this format's FusedMoE method: "triton" (drops top-k slots whose id is -1 when the
    # layer has more experts than it holds — how expert parallelism and mixed-format expert groups skip others'
    # experts) or "marlin" (GPTQ/AWQ: SGLang passes its kernel no expert map, so -1 is not known to be skipped)
    sglang_moe_runner: str = "triton"

    def describe(self, p: dict) -> str:
        return self.name

    def expected(self, p: dict, out_f: int, in_f: int) -> dict[str, Expect]:
        raise NotImplementedError

    def dequantize(self, t: dict, p: dict, out_f: int, in_f: int):
        """Reference dequantizer: stored tensors → float32 weight [out, in]."""
        raise NotImplementedError

    def tp_problem(self, p: dict, out_part: int, in_part: int) -> str | None:
        """Why a TP partition of [out_part, in_part] cannot run on the native kernel, or None."""
        return None

    def rewrite(self, suffix: str, p: dict) -> Callable | None:
        """An exact byte rewrite applied while copying (tensor → tensor), or None for a verbatim copy."""
        return None

    def output_params(self, p: dict, model_type: str) -> dict:
        """Params as written (what the manifest records): after `rewrite`, and after any change of layout that the
        target runtime needs for this model type."""
        return p

    def output_suffix(self, suffix: str, p: dict, model_type: str) -> str:
        """The tensor's suffix as written, for the layout `output_params` gives (bytes unchanged)."""
        return suffix

    def sglang_config(self, p: dict) -> tuple[str, dict] | None:
        """SGLang's native quantization method for this scheme: (registry name, the config dict its `from_config`
        takes). None: unquantized."""
        raise NotImplementedError

    def sglang_methods(self, p: dict, moe: bool) -> tuple[str, str | None]:
        """The quant-method class SGLang 0.5.17 binds for this scheme (FusedMoE when `moe`), and its scheme class
        where the method carries one (None: not checked). `verify --engine sglang` expects each layer to get these."""
        raise NotImplementedError

    def check_values(self, module: str, t: dict, p: dict) -> str | None:
        """Value-level invariants (cheap, on loaded tensors); a problem description or None."""
        return None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def check_expected(fmt: Format, scheme_params: dict, module: str, tensors: dict, out_f: int, in_f: int,
                   where: str) -> None:
    """Every expected tensor present with the right dtype and shape; nothing unexpected (bias allowed)."""
    exp = fmt.expected(scheme_params, out_f, in_f)
    for suffix, e in exp.items():
        t = tensors.get(suffix)
        if t is None:
            raise UserError(f"{where}: {module}.{suffix} is missing ({fmt.name} needs {sorted(exp)}); the checkpoint "
                            f"is incomplete")
        if not e.accepts(t.dtype, t.shape):
            raise UserError(f"{where}: {module}.{suffix} is {t.dtype}{list(t.shape)}, {fmt.name} for a "
                            f"[{out_f}, {in_f}] weight needs {'/'.join(e.dtypes)}{list(e.shape)}; the checkpoint "
                            f"does not match its config")
    extra = set(tensors) - set(exp) - {"bias"}
    if extra:
        raise UserError(f"{where}: {module} has unexpected tensors {sorted(extra)} for {fmt.name}; mpconvert does "
                        f"not know what they mean, so it will not guess")
    if "bias" in tensors and (tensors["bias"].shape != (out_f,) or tensors["bias"].dtype not in FLOAT_DTYPES):
        raise UserError(f"{where}: {module}.bias is {tensors['bias'].dtype}{list(tensors['bias'].shape)}, expected "
                        f"a float [{out_f}]")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
