"""compressed-tensors configs (llm-compressor): map `config_groups` to fp8 / int8 schemes per module.

A group has `targets` (class names such as "Linear", exact names, or `re:` regexes), `weights` and
`input_activations` args, and a `format` (or the top-level one). `ignore` lists modules left unquantized.
Supported: float 8-bit weights (tensor/channel/block; activations none/dynamic/static), int 8-bit symmetric
per-channel weights with dynamic per-token activations, and `pack-quantized` int 4/8-bit weight-only (W4A16 / W8A16:
group or channel, symmetric or with zero points; formats/wna16.py). Each refusal names the group and the reason:
sparsity, transforms, dynamic weights, 2/3/5…-bit, `naive-quantized` int weights, actorder "group".
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import UserError
from ..patterns import check_re_patterns
from .base import ConfigReader, ProducerConfig, Scheme, parse_config, register_reader
from .wna16 import PACK_FORMAT

_CLASS_TARGETS = ("Linear", "nn.Linear", "torch.nn.Linear")


class QuantArgs(BaseModel):
    """compressed-tensors QuantizationArgs, the fields mpconvert reads."""
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    num_bits: int
    type: str
    strategy: Optional[str] = None
    symmetric: bool = True
    dynamic: bool = False
    block_structure: Optional[list[int]] = Field(None, min_length=2, max_length=2)
    group_size: Optional[int] = None
    actorder: Optional[str | bool] = None

    @field_validator("block_structure")
    @classmethod
    def _block(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError(f"block_structure {v} must be two positive integers")
        return v


class ConfigGroup(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    targets: list[str] = []
    weights: Optional[QuantArgs] = None
    input_activations: Optional[QuantArgs] = None
    format: Optional[str] = None

    _targets = field_validator("targets")(classmethod(lambda cls, v: check_re_patterns(v)))


class CTConfig(ProducerConfig):
    config_groups: dict[str, ConfigGroup] = {}
    ignore: list[str] = []
    format: Optional[str] = None
    quantization_status: str = "compressed"
    sparsity_config: Optional[dict] = None
    transform_config: Optional[dict] = None

    _ignore = field_validator("ignore")(classmethod(lambda cls, v: check_re_patterns(v)))


def _matcher(targets: list[str]) -> Callable[[str], bool]:
    """Whether a module name matches any of these `ignore` or `targets` entries, as compressed-tensors matches them:
    `re:` a regex from the start of the name, a class name (every module we ask about is a linear), else the name or
    its dotted suffix. Prepared once per list — names in a set, suffixes in one str.endswith — as it is asked for
    every module of a source (88k in a DeepSeek-V3-sized job)."""
    if any(t in _CLASS_TARGETS for t in targets):
        return lambda module: True
    names = frozenset(t for t in targets if not t.startswith("re:"))
    suffixes = tuple("." + t for t in sorted(names))
    regexes = [re.compile(t[3:]).match for t in targets if t.startswith("re:")]
    if not regexes:
        return lambda module: module in names or module.endswith(suffixes)
    return lambda module: module in names or module.endswith(suffixes) or any(match(module) for match in regexes)


def scheme_of_group(group: ConfigGroup, top_format: str | None, where: str) -> Scheme:
    w, a = group.weights, group.input_activations
    if w is None:
        raise UserError(f"{where}: config group has no weights args; mpconvert reads weight-quantized groups only")
    fmt = group.format or top_format
    act = "none" if not a else ("dynamic" if a.dynamic else "static")
    if w.type == "float" and w.num_bits == 8:
        if w.strategy not in ("tensor", "channel", "block"):
            raise UserError(f"{where}: compressed-tensors FP8 weight strategy {w.strategy!r} is not supported")
        if a and a.type != "float":
            raise UserError(f"{where}: FP8 weights with non-FP8 activations are not supported")
        if w.strategy == "block" and w.block_structure is None:
            raise UserError(f"{where}: FP8 block strategy without block_structure; re-export the checkpoint")
        block = list(w.block_structure) if w.strategy == "block" else None
        return Scheme.of("fp8", layout="ct", strategy=w.strategy, block=block, activation=act)
    if w.type == "int" and a is None:
        return _weight_only_int(w, fmt, where)
    if w.type == "int" and w.num_bits == 8:
        if w.strategy != "channel" or not w.symmetric:
            raise UserError(f"{where}: int8 weights must be symmetric per-channel for SGLang's W8A8-Int8 kernel "
                            f"(found strategy={w.strategy!r}, symmetric={w.symmetric})")
        if act != "dynamic" or a.strategy != "token":
            raise UserError(f"{where}: int8 needs dynamic per-token activations for SGLang's W8A8-Int8 kernel "
                            f"(found {act}); re-quantize with scheme W8A8")
        return Scheme.of("int8", layout="ct", activation="dynamic")
    raise UserError(f"{where}: compressed-tensors scheme {w.type}{w.num_bits} (format {fmt!r}) is not "
                    f"supported; supported: FP8 (tensor/channel/block), W8A8 int8, W4A16/W8A16 pack-quantized")


def _weight_only_int(w: QuantArgs, fmt: str | None, where: str) -> Scheme:
    """W4A16 / W8A16: what SGLang 0.5.17's CompressedTensorsWNA16 (Marlin) takes, and nothing it would refuse."""
    if fmt != PACK_FORMAT:
        raise UserError(f"{where}: int{w.num_bits} weight-only in format {fmt!r}: SGLang runs it only as "
                        f"{PACK_FORMAT!r}; re-save with llm-compressor's default (save_compressed=True)")
    if w.num_bits not in (4, 8):
        raise UserError(f"{where}: {w.num_bits}-bit integer weights have no SGLang Marlin kernel (4 or 8 bits only); "
                        f"take these modules from another source")
    if w.dynamic:
        raise UserError(f"{where}: dynamic weight quantization is not a stored format; re-export with static weights")
    if w.strategy not in ("group", "channel"):
        raise UserError(f"{where}: int{w.num_bits} weight strategy {w.strategy!r}: SGLang's Marlin kernel takes "
                        f"group or channel only")
    if w.strategy == "group" and not (w.group_size and w.group_size > 0):
        raise UserError(f"{where}: group strategy without a positive group_size; the config is broken")
    actorder = {None: None, False: None, "weight": "weight", "static": "weight"}.get(w.actorder, w.actorder)
    if actorder is not None and actorder != "weight":
        raise UserError(f"{where}: actorder {w.actorder!r} (a weight_g_idx permutation): compressed-tensors >= 0.19, "
                        f"which SGLang 0.5.17 runs, can no longer load it; re-quantize with actorder='weight'")
    order = {"actorder": actorder} if actorder else {}
    return Scheme.of("wna16", bits=w.num_bits, strategy=w.strategy,
                     group_size=w.group_size if w.strategy == "group" else -1, symmetric=w.symmetric, **order)


class CompressedTensorsConfig:
    def __init__(self, qc: dict, where: str):
        self.where = where
        c = parse_config(CTConfig, qc, where)
        if c.sparsity_config:
            raise UserError(f"{where}: compressed-tensors sparsity is not supported; use a dense quantized source")
        if c.transform_config:
            raise UserError(f"{where}: compressed-tensors transforms are not supported")
        if c.quantization_status != "compressed":
            raise UserError(f"{where}: quantization_status is {c.quantization_status!r}; save with "
                            f"save_compressed=True")
        self.ignore = list(c.ignore)
        self.groups = [(name, list(g.targets), scheme_of_group(g, c.format, f"{where} {name}"))
                       for name, g in sorted(c.config_groups.items())]
        if not self.groups:
            raise UserError(f"{where}: compressed-tensors config has no config_groups")
        self._ignored = _matcher(self.ignore)
        # a name/regex target is more specific than a class target, as in compressed-tensors itself: asked first
        self._targets = [(_matcher([t]), scheme) for specific in (True, False) for _, targets, scheme in self.groups
                         for t in targets if (t not in _CLASS_TARGETS) == specific]

    def scheme_for(self, module: str) -> Scheme | None:
        if self._ignored(module):
            return None
        for matches, scheme in self._targets:
            if matches(module):
                return scheme
        return None


class CompressedTensorsReader(ConfigReader):
    kind = "compressed-tensors"
    quant_methods = ("compressed-tensors",)

    def read_config(self, qc, where):
        return CompressedTensorsConfig(qc, where)

    def scheme_of(self, module, tensors, config, where):
        w = tensors.get("weight")
        if "weight_packed" in tensors:
            what = "packed"
        elif w is not None and w.dtype in ("F8_E4M3", "I8"):
            what = w.dtype
        else:
            return None
        s = config.scheme_for(module)
        if s is None:
            raise UserError(f"{where}: {module} is quantized ({what}) but no config group targets it")
        return s


register_reader(CompressedTensorsReader())
