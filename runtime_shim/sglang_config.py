"""The `mpconvert` quantization config for SGLang: one native sub-config per format, chosen per layer prefix.

SGLang 0.5.17: linears, fused qkv / gate_up / MLA q_a+kv_a units, FusedMoE per layer, shared experts and lm_head,
each handed to the native config of its format (FP8 compressed-tensors and native, GPTQ-Marlin, AWQ-Marlin,
W8A8-Int8) built with that config's own `from_config`; DeepSeek-V3's MTP layer likewise in SGLang's NextN draft model
(speculative decoding), whose `model.decoder.*` prefixes are the checkpoint's `model.layers.{num_hidden_layers}.*`.
A layer that gets anything but its format's native method (`Format.sglang_methods`: no dequantizing, generic or
unquantized fallback) is refused at load time, naming the layer; so is a quantized unit the model class built without
the quantization config, or a checkpoint bias it has no parameter for (check_bound, on the built model before its
weights load).
Tested: tests/test_shim.py and verify --engine sglang on CPU; docs/gpu-results.md on H200.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import types
from pathlib import Path
from typing import Any, Optional

import torch
from sglang.srt.layers.quantization import QUANTIZATION_METHODS
from sglang.srt.layers.quantization.base_config import QuantizationConfig

from mpconvert.formats import FORMATS
from mpconvert.formats.fp8 import RENAMES_SCALE_INV
from mpconvert.errors import UserError
from mpconvert.layout import LAYER_PREFIX as _LAYER_PREFIX, from_nextn_draft
from mpconvert.manifest import MANIFEST, QUANT_METHOD, ExpertGroup, Manifest, load_manifest
from mpconvert.recipe import format_ids
from mpconvert.rules import (MLA_MODEL_TYPES, mla_fp8_blocks, mla_problems, model_dtypes,
                             shared_experts_fusion_problem)
from mpconvert.runtime_shim.mixed_experts import MixedExpertsMethod
from mpconvert.runtime_shim.sglang_fixes import patch_gptq_marlin_moe

logger = logging.getLogger("mpconvert")


def _check_mla(manifest: Manifest) -> Optional[types.SimpleNamespace]:
    """Refuses what the MLA loader would load wrong (rules.mla_problems: build refuses it too, verify reports it);
    returns the model-wide FP8 layout of kv_b_proj (its `linear_fp8_config`), or None where no kv_b_proj is FP8."""
    model_type = manifest.model.model_type
    if model_type not in MLA_MODEL_TYPES:
        return None  # every SGLang worker loads the config: no role lookups where no MLA loader runs
    linears = manifest.linears()
    problems = mla_problems(linears, model_type)
    if problems:
        raise ValueError(f"mpconvert: {problems[0].message}")
    blocks = mla_fp8_blocks(linears, model_type)
    return types.SimpleNamespace(weight_block_size=list(blocks.pop() or ()) or None) if blocks else None


def _model_dir(config: dict) -> Path:
    hf = config.get("hf_config")
    path = getattr(hf, "_name_or_path", None) or getattr(hf, "name_or_path", None)
    if not path:
        raise ValueError("mpconvert: SGLang passed no hf_config with the model path; cannot find the manifest")
    return Path(path)


def _check_native(layer: torch.nn.Module, prefix: str, spec, method) -> None:
    """The method must be the format's native one, not a dequantizing or generic fallback (AWQ-Marlin → AWQ,
    Marlin MoE → WNA16 MoE, unquantized); so must the scheme where the config has set one by now (linears: AWQ's
    fallback keeps AWQLinearMethod and differs only there; MoE schemes come later, verify --engine checks those)."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    want, want_scheme = FORMATS[spec.format].sglang_methods(spec.params, isinstance(layer, FusedMoE))
    got, scheme = type(method).__name__, type(getattr(layer, "scheme", None)).__name__
    scheme_set = getattr(layer, "scheme", None) is not None
    if method is None or got != want or (want_scheme is not None and scheme_set and scheme != want_scheme):
        raise ValueError(f"mpconvert: {prefix} ({spec.format}) got {got}/{scheme}, not its native "
                         f"{want}{'/' + want_scheme if want_scheme else ''}; refusing a dequantizing, generic or "
                         f"unquantized fallback")


def _check_model_dtype(layer: torch.nn.Module, unit: str, fmt: str, model_type: str, what: str = "") -> None:
    """A unit that SGLang runs only in some model dtypes (rules.model_dtypes: GPTQ-Marlin MoE in float16, an MLA
    kv_b_proj absorbed in bfloat16) loads in the others, then fails at the first forward. Say so at load time."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    moe = isinstance(layer, FusedMoE)
    dtypes = model_dtypes(unit, fmt, model_type, moe)
    what = what or unit
    dtype = torch.get_default_dtype()  # SGLang's loader builds the model under set_default_torch_dtype(model dtype)
    if not dtypes or str(dtype).removeprefix("torch.") in dtypes:
        return
    if moe:
        raise ValueError(f"mpconvert: {what} is {fmt.upper()} MoE, whose SGLang kernel runs "
                         f"{' or '.join(dtypes)} activations only, and this model runs in {dtype}; serve it with "
                         f"--dtype {dtypes[0]}, or take these experts from an AWQ, FP8 or Int8 source")
    raise ValueError(f"mpconvert: {what} is {fmt}, which SGLang's DeepSeek loader absorbs in {' or '.join(dtypes)}, "
                     f"and this model runs in {dtype}; serve it with --dtype {dtypes[0]}, or take it from the bf16 "
                     f"base")


class _instance_or_class:
    """A method that receives the instance when called on one and the class otherwise (SGLang declares these as
    classmethods but its loader calls them on the built config)."""

    def __init__(self, f):
        self.f = f

    def __get__(self, obj, cls):
        return functools.partial(self.f, cls if obj is None else obj)


def _subs(self_or_cls) -> list[QuantizationConfig]:
    if isinstance(self_or_cls, type):
        return []
    every = list(self_or_cls.subs.values()) + [n for gs in self_or_cls.groups.values() for _, n in gs]
    return list({id(s): s for s in every if s is not None}.values())


def shared_experts_apart(manifest: Manifest) -> Optional[str]:
    """Why the shared experts of some MoE layer must not be fused into its routed experts (SGLang does on a GPU), or
    None: rules.shared_experts_fusion_problem of the first layer that has one."""
    units = manifest.units
    return next(filter(None, (shared_experts_fusion_problem(units, u) for u in units if u.endswith(".mlp.experts"))),
                None)


def fused_shared_experts(model: torch.nn.Module) -> dict[str, int]:
    """What SGLang did in a built model: each FusedMoE layer into which it fused shared experts (their weights load
    there as extra experts), and how many. Where it may, shared_experts_apart decides."""
    return {n: m.num_fused_shared_experts for n, m in model.named_modules()
            if hasattr(m, "moe_runner_config") and getattr(m, "num_fused_shared_experts", 0)}


def _disable_shared_experts_fusion(why: str) -> None:
    """What --disable-shared-experts-fusion does, set in this worker before its model is built (both model classes
    and SGLang 0.5.23's loader read it then; SGLang's own models turn it off so for their mixed-precision cases)."""
    from sglang.srt.runtime_context import get_context

    try:
        get_context().override("mpconvert", disable_shared_experts_fusion=True)
    except ValueError:  # no published server config: no model is being built in this process
        return
    logger.info(f"mpconvert: {why}: shared experts fusion disabled (SGLang fuses them through the routed experts' "
                f"quant method)")


class MpconvertConfig(QuantizationConfig):
    def __init__(self, manifest: Manifest, subs: dict[str, Optional[QuantizationConfig]],
                 groups: dict[str, list[tuple[ExpertGroup, Optional[QuantizationConfig]]]],
                 linear_fp8_config: Optional[types.SimpleNamespace] = None):
        super().__init__()
        self.manifest = manifest
        self.subs = subs  # SGLang layer prefix (unit) → native config, None = unquantized
        self.groups = groups  # mixed-experts MoE layer prefix → (manifest group, native config) per format
        # DeepSeek's loader reads the FP8 block of kv_b_proj here (absorbed into w_kc/w_vc after loading)
        self.linear_fp8_config = linear_fp8_config
        # each unit's name inside its layer ("mlp.down_proj") → the units of that name: what SGLang asks for when its
        # model class builds the decoder layers without their names (Gemma 2 in SGLang 0.5.17 and 0.5.23)
        self.in_layer: dict[str, list[str]] = {}
        for u in (*subs, *groups):
            if _LAYER_PREFIX.match(u):
                self.in_layer.setdefault(_LAYER_PREFIX.sub("", u, count=1), []).append(u)

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant):
        if hf_quant_cfg and hf_quant_cfg.get("quant_method") == QUANT_METHOD:
            return QUANT_METHOD
        return None

    # SGLang's loader asks the built config (an instance) for both, so each answers for this model's formats: the
    # strictest capability and the act dtypes every format takes. Asked on the class, they give Marlin's floor.
    @_instance_or_class
    def get_supported_act_dtypes(self_or_cls) -> list[torch.dtype]:
        dtypes = [torch.bfloat16, torch.half]
        for sub in _subs(self_or_cls):
            dtypes = [d for d in dtypes if d in sub.get_supported_act_dtypes()]
        return dtypes

    @_instance_or_class
    def get_min_capability(self_or_cls) -> int:
        return max([80] + [sub.get_min_capability() for sub in _subs(self_or_cls)])

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MpconvertConfig":
        d = _model_dir(config)
        try:
            manifest, raw = load_manifest(d)
        except UserError as e:  # a missing, old or schema-breaking manifest: SGLang reports ValueErrors at load
            raise ValueError(f"mpconvert: {e}; run `mpconvert verify {d}`") from None
        if config.get("manifest_sha256") != hashlib.sha256(raw).hexdigest():
            raise ValueError(f"mpconvert: {d / MANIFEST} does not match config.json's manifest_sha256 (edited after "
                             f"build?); run `mpconvert verify {d}`")
        model_type = manifest.model.model_type
        linear_fp8_config = _check_mla(manifest)
        built: dict[str, QuantizationConfig] = {}

        def native(unit: str, fmt: str, params: dict) -> Optional[QuantizationConfig]:
            spec = FORMATS[fmt].sglang_config(params)
            if spec is None:
                return None
            name, cfg = spec
            if name == "fp8" and "weight_block_size" in cfg and model_type in RENAMES_SCALE_INV:
                # build writes these in the compressed-tensors layout; a manifest that still has them is stale
                raise ValueError(f"mpconvert: {unit} is native block FP8 (weight_scale_inv) in a {model_type} model, "
                                 f"whose SGLang loader renames that scale and serves garbage; rebuild with this "
                                 f"mpconvert, which writes it in the compressed-tensors layout")
            key = name + json.dumps(cfg, sort_keys=True)
            if key not in built:
                cfg = {**cfg, "packed_modules_mapping": config.get("packed_modules_mapping") or {}}
                built[key] = QUANTIZATION_METHODS[name].from_config(cfg)
            return built[key]

        subs: dict[str, Optional[QuantizationConfig]] = {}
        groups: dict[str, list[tuple[ExpertGroup, Optional[QuantizationConfig]]]] = {}
        for unit, spec in manifest.units.items():
            if spec.groups:
                groups[unit] = [(g, native(unit, g.format, g.params)) for g in spec.groups]
            else:
                subs[unit] = native(unit, spec.format, spec.params)
        why = shared_experts_apart(manifest)
        if why:
            _disable_shared_experts_fusion(why)
        return cls(manifest, subs, groups, linear_fp8_config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

        sglang_prefix, prefix = prefix, from_nextn_draft(prefix, self.manifest.model.num_hidden_layers)
        if prefix in self.groups:
            for spec, sub in self.groups[prefix]:
                if sub is not None:
                    _check_model_dtype(layer, prefix, spec.format, self.manifest.model.model_type,
                                       f"{prefix} experts {format_ids(sorted(spec.experts))}")
            return MixedExpertsMethod(sglang_prefix, self.groups[prefix], _check_native)
        if prefix not in self.subs and isinstance(layer, LinearBase) and prefix in self.in_layer:
            prefix = self._unit_of_nameless(layer, prefix)
        if prefix not in self.subs:
            # not a module the manifest assigns (embeddings, routers, norms): SGLang's unquantized default
            return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None
        sub = self.subs[prefix]
        if sub is None:
            return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None
        _check_model_dtype(layer, prefix, self.manifest.units[prefix].format, self.manifest.model.model_type)
        method = sub.get_quant_method(layer, prefix)
        _check_native(layer, prefix, self.manifest.units[prefix], method)
        return patch_gptq_marlin_moe(method)

    def check_bound(self, model: torch.nn.Module) -> None:
        """Refuses a model SGLang built with a quantized unit of the manifest out of the shim's reach: its model class
        did not hand the quantization config to that part (SGLang 0.5.17's StableLM builds its attention so), which
        then holds unquantized parameters — the load fails on the first scale (a KeyError deep in SGLang's loader)
        or, where the loader skips names it lacks, copies the quantized weight in as values: wrong without an error.
        Called once the model is built, before any weight is loaded (register's wrap of SGLang's _initialize_model)."""
        n = self.manifest.model.num_hidden_layers
        built = {}
        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            unit = from_nextn_draft(name, n)
            built[unit] = module
            quantized = unit in self.groups or self.subs.get(unit) is not None
            if quantized and method is not None and type(method).__name__.startswith("Unquantized"):
                raise ValueError(
                    f"mpconvert: SGLang's {type(model).__name__} built {unit} without the quantization config (its "
                    f"model class does not hand it to that part), so it holds unquantized weights, but the directory "
                    f"stores {unit} as {self.manifest.units[unit].describe()}: the load would fail or read the "
                    f"quantized bytes as values; build {unit} unquantized (from the base) for this model class")
        self._check_biases(model, built)

    def _check_biases(self, model: torch.nn.Module, built: dict[str, torch.nn.Module]) -> None:
        """Refuses a checkpoint bias the model class has no parameter for: SGLang's loaders skip a `.bias` they lack
        without a word (SGLang 0.5.17's Llama builds its MLP without biases whatever `mlp_bias` says), so the layer
        would be served without it — wrong, and unseen by verify. Every linear, the LM head among them (a Llama's
        ParallelLMHead has no bias either), routed experts aside; a unit this model does not build (pipeline stages,
        draft models) is not asked about."""
        for name, m in self.manifest.modules.items():
            if m.kind != "linear" or m.expert is not None or "bias" not in m.rows:
                continue
            module = built.get(m.unit)
            if module is not None and getattr(module, "bias", None) is None:
                raise ValueError(
                    f"mpconvert: SGLang's {type(model).__name__} builds {m.unit} without a bias, so its loader would "
                    f"skip {name}.bias without a word and serve the layer without it (the base served as it is loses "
                    f"it too): this SGLang model class cannot serve this model as it was trained")

    def _unit_of_nameless(self, layer: torch.nn.Module, part: str) -> str:
        """A unit whose format every unit of that name in the model shares, for a layer SGLang names only by its
        part of a decoder layer; refused where the layers differ: no layer's own format can be bound, and the
        unquantized default would meet the checkpoint's scales at load (a KeyError) or read FP8 bytes as values."""
        a, *rest = self.in_layer[part]
        schemes = self.manifest.units[a].schemes()
        b = next((u for u in rest if u in self.groups or self.manifest.units[u].schemes() != schemes), None)
        if b is None and a not in self.groups:
            return a
        b = b or a
        raise ValueError(f"mpconvert: SGLang's {type(layer).__name__} asked for the format of {part!r} without its "
                         f"layer's name (its {self.manifest.model.model_type} model class builds the decoder layers "
                         f"without their prefix), so no layer's own format can be bound, and they differ: {a} is "
                         f"{self.manifest.units[a].describe()}, {b} {self.manifest.units[b].describe()}; give every "
                         f"layer's {part} one format")

    def get_scaled_act_names(self) -> list[str]:
        return []
