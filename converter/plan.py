"""Planning: resolve every rule, check every constraint, and list every output tensor — before any byte is written.

Follows the compressed-tensors converter protocol: validate all inputs first (this module), then process (writer.py).
A failure here is one UserError naming the module, the rules involved and the fix.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import TOKENIZER_FILES, Checkpoint, auto_map_modules, loose_json, tokenizer_among
from .errors import UserError
from . import ct_export
from .forked import Forked
from .formats import FORMATS, Scheme, check_expected
from .formats.base import CT_LAYOUT, LAYOUTS, MP_LAYOUT, check_values_batched, value_suffixes
from .layout import (ModelInfo, Role, check_config_matches_weights, check_same_architecture, natural_key,
                     norm_offset, role_of, stage_norms, unknown_module)
from .manifest import MIXED_EXPERTS
from .recipe import BASE, Recipe, format_ids, literal_prefix
from . import rules
from .safetensors_io import (TensorInfo, forget_open_files, load_array, load_tensor, nbytes_of,
                             offset_round_trip, same_values, sha256_of)
from .sources import Source, open_source, source_of


@dataclass(slots=True)  # 171k of them in a DeepSeek-V3-sized job
class TensorPlan:
    name: str  # output name
    src: TensorInfo | None  # the stored tensor it is copied (or rewritten) from; None for one a repack makes
    source: str
    rewrite: Callable | None = None
    rewrite_name: str | None = None
    renamed_from: str | None = None  # the source's suffix, where the written layout names it differently
    made: "Callable[[], object] | None" = None  # a repacked tensor: its maker (RepackJob.maker)
    made_as: tuple[str, tuple[int, ...]] | None = None  # a repacked tensor's (dtype, shape)

    @property
    def dtype(self) -> str:
        return self.made_as[0] if self.made_as else self.src.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.made_as[1] if self.made_as else self.src.shape

    @property
    def nbytes(self) -> int:
        return nbytes_of(*self.made_as) if self.made_as else self.src.nbytes


class RepackJob:
    """One module's lossless repack (Format.repack): on the first request, its stored tensors are loaded, every
    written tensor made, and the module proven exact — the written scheme's dequantized weight torch.equal to the
    source's — then each tensor handed out once. Memory: one module."""

    def __init__(self, module: str, fmt, params: dict, target: Scheme, stored: dict[str, TensorInfo], out_f: int,
                 in_f: int, where: str):
        self.module, self.fmt, self.params, self.target, self.stored = module, fmt, params, target, stored
        self.out_f, self.in_f, self.where = out_f, in_f, where
        self.pending: dict | None = None

    def maker(self, suffix: str) -> Callable[[], object]:
        return lambda: self._take(suffix)

    def _take(self, suffix: str):
        if self.pending is None:
            self.pending = self._made()
        return self.pending.pop(suffix)

    def _made(self) -> dict:
        import torch

        t = {s: load_tensor(i) for s, i in self.stored.items() if s != "bias"}
        out = self.fmt.repack_tensors(t, self.params, self.out_f, self.in_f)
        target = self.target
        before = self.fmt.dequantize(t, self.params, self.out_f, self.in_f)
        after = FORMATS[target.format].dequantize(out, target.params, self.out_f, self.in_f)
        if not torch.equal(before, after):
            raise UserError(f"{self.where}: repacking {self.module} into {target.describe()} changed its weight "
                            f"(max difference {float((before - after).abs().max()):.3g}); nothing was written — "
                            f"please report this with the checkpoint")
        return out


@dataclass
class ModulePlan:
    name: str
    role: Role
    scheme: Scheme  # as written (after exact rewrites)
    source: str
    why: str  # the rule (or default / coupling reason) that chose the source
    out_features: int
    in_features: int
    tensors: dict[str, TensorPlan] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.role.kind

    @property
    def format(self) -> str:
        return self.scheme.format

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def weight_bytes(self) -> int:
        return sum(t.nbytes for s, t in self.tensors.items() if s != "bias")

    def linear(self) -> rules.Linear:
        return rules.Linear(self.name, self.role, self.scheme, self.source, self.why, self.out_features,
                            self.in_features, "bias" in self.tensors)


@dataclass
class Plan:
    recipe: Recipe
    base: Source
    sources: dict[str, Source]
    info: ModelInfo
    parallel: rules.Parallel  # the sizes every split was checked at (rules.partition_problems)
    layout: str  # MP_LAYOUT or CT_LAYOUT (build --to compressed-tensors)
    modules: list[ModulePlan]
    tensors: list[TensorPlan]
    units: dict[str, dict]
    side_files: dict[str, Path]  # what the output gets besides weights and config: name → the file copied
    side_note: str | None  # what build says of them ("note: …" or "warning: …"), or None

    def forget_unplanned(self) -> None:
        """Drop what planning read and writing never needs: every source's tensor map and the modules the plan does
        not take from it (400k header entries in a DeepSeek-V3-sized job — a third of build's peak memory). The
        sources keep their files, fingerprints and descriptions, the planned modules their tensors."""
        planned: dict[str, set[str]] = {}
        for m in self.modules:
            planned.setdefault(m.source, set()).add(m.name)
        for label, src in self.sources.items():
            src.describe()
            src.ckpt.tensors = {}
            src.modules = {n: v for n, v in src.modules.items() if n in planned.get(label, ())}

    @cached_property
    def total_bytes(self) -> int:
        """Asked six times by one build (writer, manifest, index); a plan's tensors are fixed once planned."""
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Inputs:
    """The recipe's checkpoints, opened (headers only): the base, every source by label (the base among them), the
    model's shape."""
    base: Source
    sources: dict[str, Source]
    info: ModelInfo

    @classmethod
    def open(cls, recipe: Recipe) -> "Inputs":
        ck = Checkpoint.open(recipe.path_of(BASE), "base")
        cfg = ck.config  # read once: it names the modules (model_type) and is what every source must match
        info = ModelInfo.from_config(cfg, f"base ({ck.path})")
        base = source_of("base", ck, info.model_type)
        if base.kind != "unquantized":
            raise UserError(f"base ({ck.path}) is quantized ({base.kind}); the base must be the bf16/fp16 model (it "
                            f"provides config, tokenizer and reference weights)")
        ck.side_files  # (a property that checks them: now, before planning, not when the writer copies them)
        check_config_matches_weights(cfg, {n: m.tensors["weight"].shape for n, m in base.modules.items()
                                           if "weight" in m.tensors}, f"base ({ck.path})")
        sources = {BASE: base}
        for name in sorted(recipe.sources):
            src = open_source(name, recipe.path_of(name), info.model_type)
            check_same_architecture(cfg, src.ckpt.config, f"source {name!r}")
            sources[name] = src
        return cls(base, sources, info)

    def roles(self, mtp: str = "keep") -> dict[str, Role]:
        """Every module of the base with its role, in natural order (without the MTP layers when mtp is "drop"); a
        source module the base lacks is refused."""
        roles, dropped = {}, set()
        for name in sorted(self.base.modules, key=natural_key):
            role = role_of(name)
            if role is None:
                raise UserError(unknown_module(name, "base"))
            if mtp == "drop" and self.info.mtp_layer_of(name) is not None:
                dropped.add(name)
            else:
                roles[name] = role
        for label, src in self.sources.items():
            extra = sorted(set(src.modules) - set(roles) - dropped, key=natural_key)
            mtp_extra = [n for n in extra if self.info.mtp_layer_of(n) is not None]
            if mtp == "drop":
                extra = [n for n in extra if n not in mtp_extra]
            elif mtp_extra:
                layer = self.info.mtp_layer_of(mtp_extra[0])
                raise UserError(f"source {label!r} holds the multi-token-prediction (MTP) layer {layer}, which the "
                                f"base lacks (transformers drops it when saving); add `mtp: drop` to the recipe to "
                                f"leave it out, or use a base that has it")
            if extra and _tied_head_copy(src, extra[0]):
                extra = extra[1:]  # (sorted naturally: lm_head, of no layer, comes first)
            if extra and role_of(extra[0]) is None:  # (a checkpoint that fused q/k/v, say, where the base did not)
                raise UserError(unknown_module(extra[0], f"source {label!r}"))
            if extra:
                raise UserError(f"source {label!r}: module {extra[0]!r} is not in the base model; every source must "
                                f"quantize the same architecture")
        return roles


def _tied_head_copy(src: Source, name: str) -> bool:
    """Whether a source module the base lacks is only its tied output head saved as a tensor of its own: some
    exporters write lm_head.weight beside the embedding it is tied to. The base has no head (so it ties it:
    check_config_matches_weights), the output ties its head as the base does, and SGLang skips such a tensor when it
    loads a tied model — nothing to take, as long as it holds the source's embedding unquantized, value for value.
    A head of other values is no copy: that source's model is not the base's (refused as a module the base lacks)."""
    role = role_of(name)
    if role is None or role.slot != "lm_head" or set(src.modules[name].tensors) != {"weight"}:
        return False
    embed = next((m for n, m in src.modules.items() if (r := role_of(n)) is not None and r.kind == "embedding"
                  and r.layer is None), None)
    return embed is not None and "weight" in embed.tensors and \
        same_values(src.modules[name].tensors["weight"], embed.tensors["weight"])


_ARTICLE = {"norm": "a", "router": "a", "embedding": "an"}  # "a norm", "an embedding"
_INNER_LAYER = re.compile(r"\.model\.layers\.\d+\.")  # a name a literal_prefix pattern may match by a dotted tail


class RuleMatcher:
    """Which source every linear module comes from: the recipe's rules in order, first match wins, else the default;
    a rule that selects nothing is an error."""

    def __init__(self, recipe: Recipe, info: ModelInfo, roles: dict[str, Role]):
        self.recipe, self.info, self.roles = recipe, info, roles
        self.moe = {r.layer for r in roles.values() if r.expert is not None}

    def assign(self) -> dict[str, tuple[str, str]]:
        """module → (source, why) for every linear module."""
        roles = self.roles
        self._check_filters()
        # each rule prepared once, its answer (source, why) made once: planning asks every rule about every linear
        # (214k questions in a DeepSeek-V3-sized job)
        recipe_rules = self.recipe.rules
        linear_names = [name for name, role in roles.items() if role.kind == "linear"]
        # A rule with `layers` (or whose patterns all begin `model.layers.N.`) looks at those layers' modules only: a
        # per-expert recipe has a rule per layer and expert range (976 for DeepSeek-V3: 35 s when each rule scanned
        # all 44k linears; 4,900 rules naming modules: 100 s)
        in_layer: dict[int | None, list[str]] = {}
        for name in linear_names:
            in_layer.setdefault(roles[name].layer, []).append(name)
        by_text = sorted(linear_names)  # names with a literal prefix: one range of it
        inner = [name for name in linear_names if _INNER_LAYER.search(name)]  # (none in the supported models)
        order = {name: i for i, name in enumerate(linear_names)}
        prepared = [self._selector(i, linear_names, in_layer, (by_text, inner), order)
                    for i in range(len(recipe_rules))]
        picks = [(rule.source, rule.describe(i)) for i, rule in enumerate(recipe_rules)]
        default = (self.recipe.default, f"default ({self.recipe.default})")
        hits = [0] * len(recipe_rules)
        # rule by rule, in order, over the modules its patterns name and no earlier rule took: first match wins
        taken: dict[str, tuple[str, str]] = {}
        for i, (named, selected) in enumerate(prepared):
            for name in named:  # in module order: a routing file's error names the first module's layer, every run
                if name not in taken and selected(name, roles[name]):
                    hits[i] += 1
                    taken[name] = picks[i]
        chosen = {name: taken.get(name, default) for name in linear_names}  # in module order
        for i, n in enumerate(hits):
            if n == 0:
                rule = recipe_rules[i]
                shadow = any(prepared[i][1](name, roles[name]) for name in linear_names)
                why = "every module it matches is taken by an earlier rule" if shadow else self._no_linear(rule)
                like = next((name for name in linear_names if roles[name].layer is not None), linear_names[0])
                raise UserError(f"recipe: {rule.describe(i)} selects nothing: {why}; fix or remove the rule "
                                f"(linear modules look like {like!r})")
        return chosen

    def _no_linear(self, rule) -> str:
        """Why a rule matches no linear module: it names only modules of another kind, or an lm_head the model ties
        to its embeddings, or nothing at all."""
        other = next((name for name, role in self.roles.items() if role.kind != "linear" and rule.matches_name(name)),
                     None)
        if other is not None:
            kind = self.roles[other].kind
            return (f"it matches only modules that are not linear layers ({other}: {_ARTICLE[kind]} {kind}); "
                    f"rules choose where linear layers come from — norms, routers and embeddings follow the linears "
                    f"that read them")
        if "lm_head" not in self.roles and rule.matches_name("lm_head"):
            return "the model has no lm_head of its own (it ties the output head to the embeddings)"
        return "it matches no module"

    def _check_filters(self) -> None:
        """Every layer and expert a rule names exists (a rule written for a larger model is refused, not cut to
        fit), and a routing file's counts are this model's."""
        present = sorted({r.layer for r in self.roles.values() if r.layer is not None})
        for i, rule in enumerate(self.recipe.rules):
            missing = sorted(rule.layer_set - set(present)) if rule.layer_set is not None else []
            if missing:
                raise UserError(f"recipe: {rule.describe(i)} names layer{'s' if len(missing) > 1 else ''} "
                                f"{format_ids(missing)}, which the model lacks (it has layers {format_ids(present)}); "
                                f"fix the rule's layers")
        n = self.info.num_experts
        for i, rule in enumerate(self.recipe.rules):
            if rule.experts is None:
                continue
            if not n:
                raise UserError(f"recipe: {rule.describe(i)} selects experts, but {self.info.model_type} has no "
                                f"routed experts; remove experts:")
            ids = rule.expert_ids
            if ids is not None and max(ids) >= n:
                raise UserError(f"recipe: {rule.describe(i)} names expert {max(ids)}, but the model has {n} routed "
                                f"experts per layer (ids 0-{n - 1})")
            if ids is None:  # from a routing file: it must have been recorded on this model
                layers = self.info.num_layers
                counts_of = self.recipe.routing_counts(i)
                unrecorded = sorted(m for m in self.moe if m >= layers and m not in counts_of
                                    and (rule.layer_set is None or m in rule.layer_set))
                if unrecorded:
                    raise UserError(f"recipe: {rule.describe(i)}: the routing file has no counts for the multi-token-"
                                    f"prediction (MTP) layer {unrecorded[0]} (SGLang records routing over the model's "
                                    f"own layers); limit the rule with `layers: 0-{layers - 1}`, or add `mtp: drop`")
                for layer, counts in sorted(counts_of.items()):
                    if not 0 <= layer < layers:
                        raise UserError(f"recipe: {rule.describe(i)}: the routing file has counts for layer {layer}, "
                                        f"but the model has layers 0-{layers - 1}; record it on this model")
                    if len(counts) != n:
                        raise UserError(f"recipe: {rule.describe(i)}: the routing file counts {len(counts)} experts "
                                        f"in layer {layer}, but the model has {n}; record it on this model")

    def _selector(self, index: int, names: list[str], in_layer: dict[int | None, list[str]],
                  by_text: tuple[list[str], list[str]], order: dict[str, int]
                  ) -> tuple[list[str], Callable[[str, Role], bool]]:
        """The modules of `names` that rules[index]'s patterns match — looking only at its layers' modules when it
        names layers (`in_layer`), or at the names beginning with its patterns' literal prefixes (`by_text`: the names
        sorted, and those that could match by a dotted tail) —, in module order (`order`; run over the names at once:
        a C loop for a rule's single pattern), and whether the rule selects a module: those patterns (looked up),
        then its layers, moe and experts filters, each prepared once."""
        rule, routed, moe_layers = self.recipe.rules[index], self.recipe.routed_experts, self.moe
        tests, layers, moe, experts = rule.name_tests(), rule.layer_set, rule.moe, rule.experts is not None
        prefixes = list(map(literal_prefix, rule.patterns))
        if layers is not None:
            names = sorted((n for layer in layers for n in in_layer.get(layer, ())), key=order.__getitem__)
        elif None not in prefixes:
            text, inner = by_text
            spans = ((bisect.bisect_left(text, p), bisect.bisect_left(text, p[:-1] + chr(ord(p[-1]) + 1)))
                     for p in prefixes)  # [p, p's successor): every name that begins with p
            names = sorted({*inner, *(n for lo, hi in spans for n in text[lo:hi])}, key=order.__getitem__)
        in_order = list(filter(tests[0], names)) if len(tests) == 1 else [n for n in names if any(t(n) for t in tests)]
        named = set(in_order)

        def selects(name: str, role: Role) -> bool:
            if name not in named:
                return False
            if layers is not None and role.layer not in layers:
                return False
            if moe is not None and (role.layer in moe_layers) != moe:
                return False
            if experts:
                return role.expert is not None and role.expert in routed(index, role.layer)
            return True
        return in_order, selects


def unchanged_norm(t: TensorInfo, base_t: TensorInfo, model_type: str) -> bool:
    """Whether a source's norm holds the base's: the same values, or — in a model whose norms scale by (1 + weight)
    — the base's after llm-compressor's round trip through (1 + weight) (safetensors_io.offset_round_trip), a
    rounding no fold made: taken as the base's, so its readers mix with any source's and the output keeps the base's
    exact norm (every llm-compressor Gemma 3 was refused: "changed post_attention_layernorm, which mpconvert cannot
    couple")."""
    return same_values(t, base_t) or (norm_offset(model_type) != 0 and offset_round_trip(t, base_t))


def _uncoupled_change(label: str, name: str, role: Role, model_type: str) -> str:
    """Why a source that changed a module no linear reads is refused: the output would take the base's (no module
    carries that source's with it), while the source's linears were made against its own."""
    if role.kind != "norm":
        return (f"source {label!r} changed {name} (the {role.kind}), which no linear it could supply carries with it; "
                f"take no module from that source, or use one that keeps the base's {name}")
    return (f"source {label!r} changed {name}, which no linear reads (it normalizes a block's output, the final "
            f"hidden state, or queries and keys), so no module can carry the change: its producer folded scales into "
            f"a norm that does not feed the folded linears in this {model_type} model (a SmoothQuant or AWQ mapping "
            f"made for another block layout) or changed the model itself; take no module from that source, or "
            f"quantize with this architecture's own mapping")


def bias_mismatch(base_tensors: dict, tensors: dict) -> str | None:
    """How a source's module differs from the base's in carrying a bias (a producer that dropped or added one);
    None where both have one or neither has."""
    if ("bias" in base_tensors) == ("bias" in tensors):
        return None
    return "without the bias the base has" if "bias" in base_tensors else "with a bias the base has not"


class _Planner:
    """Module by module: every linear from its chosen source (checked against its format), every norm, router and
    embedding from the source its consumers were quantized against; then the shared rules over the whole."""

    def __init__(self, recipe: Recipe, parallel: rules.Parallel, layout: str):
        self.recipe, self.parallel, self.layout = recipe, parallel, layout
        inputs = Inputs.open(recipe)
        self.base, self.sources, self.info = inputs.base, inputs.sources, inputs.info
        self.roles = inputs.roles(recipe.mtp)
        self._hash_cache: dict[tuple[str, str], str] = {}

    def stored_views(self, chosen: dict[str, tuple[str, str]]) -> dict:
        """Every linear module as its chosen source stores it, its tensors' dtypes and shapes checked against its
        format (the first problem in module order refused)."""
        return {name: self._stored_view(name, source, why) for name, (source, why) in chosen.items()}

    def value_problems(self, chosen: dict[str, tuple[str, str]], views: dict) -> str | None:
        """The first problem in module order of the linears' values (in batches, check_values_batched: a
        DeepSeek-V3-sized job has 45k linears), as the message that refuses it; None when there is none."""
        problems = check_values_batched(((name, view.scheme, {s: view.tensors[s] for s in value_suffixes(view.scheme)})
                                         for name, view in views.items()), serve_layout=self.layout)
        for name in chosen:
            for kind, problem in problems.get(name, ()):
                source = chosen[name][0]
                if kind == "values":
                    return (f"source {source!r} ({self.sources[source].ckpt.path}): {problem}; the checkpoint is "
                            f"corrupt or was written wrongly — re-export it or take {name} from another source")
                return f"source {source!r}: {problem}; or take {name} from another source"
        return None

    def _stored_view(self, name: str, source: str, why: str):
        """The module as `source` stores it, its tensors' dtypes and shapes checked against its format."""
        base_w = self.base.modules[name].tensors.get("weight")
        if base_w is None or len(base_w.shape) != 2:
            raise UserError(f"base: {name}.weight is missing or not 2-D")
        view = self.sources[source].modules.get(name)
        if view is None:
            layer = self.info.mtp_layer_of(name)
            if layer is not None:
                raise UserError(f"source {source!r} has no module {name} (chosen by {why}): it lacks the multi-token-"
                                f"prediction (MTP) layer {layer}, as most quantizers do; take that layer from a "
                                f"source that has it (a rule with `layers: {layer}`) or add `mtp: drop` to the recipe")
            raise UserError(f"source {source!r} has no module {name} (chosen by {why}); take it from a source "
                            f"that has it")
        check_expected(view.scheme, name, view.tensors, *base_w.shape, f"source {source!r}")
        mismatch = bias_mismatch(self.base.modules[name].tensors, view.tensors)
        if mismatch:
            raise UserError(f"source {source!r} ({self.sources[source].ckpt.path}) stores {name} {mismatch} (chosen "
                            f"by {why}): SGLang builds the bias from the model's config and would serve it "
                            f"uninitialized or fail to load — take {name} from a source that matches the base")
        return view

    def module_plan(self, name: str, role: Role, source: str, why: str, view) -> ModulePlan:
        """A checked module's plan: its tensors copied (or repacked) into the scheme it is written in."""
        out_f, in_f = self.base.modules[name].tensors["weight"].shape
        target = repack_target(view.scheme, self.layout)
        if target is not None:
            return self._repacked(name, role, source, why, view, target, out_f, in_f)
        mp = ModulePlan(name, role, written_scheme(view.scheme, self.info.model_type, self.layout), source, why,
                        out_f, in_f)
        stored = view.tensors
        for suffix, out, rw_name, rw in _written_suffixes(view.scheme, tuple(stored), self.info.model_type,
                                                          self.layout):
            mp.tensors[out] = TensorPlan(f"{name}.{out}", stored[suffix], source, rw, rw_name,
                                         suffix if out != suffix else None)
        return mp

    def _repacked(self, name: str, role: Role, source: str, why: str, view, target: Scheme, out_f: int,
                  in_f: int) -> ModulePlan:
        where = f"source {source!r} ({self.sources[source].ckpt.path})"
        job = RepackJob(name, FORMATS[view.scheme.format], view.scheme.params, target, view.tensors, out_f, in_f,
                        where)
        how = f"repack_{view.scheme.format}_to_{target.format}"
        mp = ModulePlan(name, role, target, source, why, out_f, in_f)
        for suffix, (origin, stored, dtype, shape) in repack_layout(view, target, out_f, in_f).items():
            mp.tensors[suffix] = TensorPlan(f"{name}.{suffix}", stored, source, None, how, origin,
                                            job.maker(suffix), (dtype, shape))
        if "bias" in view.tensors:
            mp.tensors["bias"] = TensorPlan(f"{name}.bias", view.tensors["bias"], source)
        return mp

    def check_units(self, linears: list[rules.Linear]) -> dict[str, dict]:
        """The unit table (SGLang layer prefix → format, params, members; a mixed-experts layer's groups), after the
        fused-unit rules (rules.unit_problems)."""
        out = {}
        for unit, members in rules.by_unit(linears).items():
            _raise_first(rules.unit_problems(unit, members))
            names = [m.name for m in members]
            if len({m.scheme for m in members}) > 1:  # expert-level mixed precision (runtime_shim.mixed_experts)
                out[unit] = {"format": MIXED_EXPERTS, "params": {}, "members": names,
                             "groups": [{"format": s.format, "params": s.params, "experts": ids}
                                        for s, ids in rules.expert_groups(members)]}
            else:
                s = members[0].scheme
                out[unit] = {"format": s.format, "params": s.params, "members": names}
        return out

    # ---- folded scales -------------------------------------------------------------------------------------
    def _value_key(self, src: Source, module: str) -> str:
        """Identity of a non-linear tensor's *values* in a source: equal bytes or equal values → same key."""
        key = (src.label, module)
        if key not in self._hash_cache:
            t = src.modules[module].tensors["weight"]
            base_t = self.base.modules[module].tensors["weight"]
            if src is self.base:
                unchanged = True
            elif self.roles[module].kind == "norm":
                unchanged = unchanged_norm(t, base_t, self.info.model_type)
            else:
                unchanged = same_values(t, base_t)
            self._hash_cache[key] = "base" if unchanged else f"{src.label}:{sha256_of(t)}"
        return self._hash_cache[key]

    def support_plans(self, roles: dict[str, Role], linears: list[rules.Linear]) -> list[ModulePlan]:
        """Norms, routers, embeddings: take the version the consuming linears were quantized against."""
        readers = rules.readers_of(roles, linears, stage_norms(roles))
        used = sorted({m.source for m in linears} - {BASE})
        plans = []
        for name, role in roles.items():
            if role.kind == "linear":
                continue
            users = readers.get(name, [])
            versions: dict[str, list[rules.Linear]] = {}
            for u in users:
                src = self.sources[u.source]
                if name not in src.modules:
                    raise UserError(f"source {u.source!r} lacks {name}, which {u.name} was quantized against")
                _check_unquantized(src, u.source, name, role)
                versions.setdefault(self._value_key(src, name), []).append(u)
            if len(versions) > 1:
                desc = "; ".join(f"{ms[0].name.rsplit('.', 1)[-1]} from {ms[0].source!r} via {ms[0].why}"
                                 for ms in versions.values())
                raise UserError(f"folded scales: {name} differs between the sources of its consumers ({desc}); "
                                f"a folded-scale source (AWQ/SmoothQuant) changed it, so all modules reading it "
                                f"must come from that source — assign them together")
            if versions:
                (key, ms), = versions.items()
                source = BASE if key == "base" else ms[0].source
                why = "base" if key == "base" else f"folded scales of {ms[0].name} ({ms[0].source!r})"
            else:
                source, why = BASE, "base"
                for label in used:  # nothing couples it: every source we use must agree with the base
                    src = self.sources[label]
                    if name in src.modules and self._value_key(src, name) != "base":
                        raise UserError(_uncoupled_change(label, name, role, self.info.model_type))
            _raise_first(rules.norm_problems(name, role, source, users))
            view = self.sources[source].modules[name]
            w = view.tensors["weight"]
            if role.kind in ("norm", "router") and not np.isfinite(load_array(w)).all():
                raise UserError(f"source {source!r} ({self.sources[source].ckpt.path}): {name}.weight has NaN or "
                                f"infinite values; the checkpoint is corrupt — re-export it")
            mp = ModulePlan(name, role, Scheme.of("unquantized", dtype=w.dtype), source, why,
                            *(tuple(w.shape) + (1,))[:2])
            for suffix in sorted(view.tensors):
                mp.tensors[suffix] = TensorPlan(f"{name}.{suffix}", view.tensors[suffix], source)
            plans.append(mp)
        return plans

    def plan(self) -> Plan:
        chosen = RuleMatcher(self.recipe, self.info, self.roles).assign()
        views = self.stored_views(chosen)
        # the linears' values (most of the tensor data planning reads) are checked in a child process on the other
        # core while the rest is planned here; a problem there is refused first, as when it ran in turn
        values = Forked(lambda step: self.value_problems(chosen, views), lambda n: None)
        try:
            plan = self._plan(chosen, views)
        except UserError:
            _refuse(values.result())
            raise
        except BaseException:
            values.cancel()
            raise
        _refuse(values.result())
        return plan

    def _plan(self, chosen: dict[str, tuple[str, str]], views: dict) -> Plan:
        roles = self.roles
        linear = [self.module_plan(name, roles[name], *chosen[name], views[name]) for name in chosen]
        linears = [m.linear() for m in linear]  # what the shared rules see
        units = self.check_units(linears)
        _raise_first(rules.pair_problems(linears))
        _raise_first(rules.bias_problems(linears))
        support = self.support_plans(roles, linears)
        _raise_first(rules.mla_problems(linears, self.info.model_type))
        _raise_first(rules.dtype_problems(linears, self.info.model_type))
        _raise_first(rules.partition_problems(linears, self.info, self.parallel))
        if self.layout == CT_LAYOUT:
            _raise_first(ct_export.problems(linears, units, self.info))
        place = dict(zip(roles, range(len(roles))))  # roles are in natural order already: no natural key again
        modules = sorted(linear + support, key=lambda m: place[m.name])
        # module by module, each one's tensors by suffix: the natural order of the names (a module's name followed
        # by "." sorts before any longer name it prefixes), without a natural key for each of 171k tensors
        tensors = [m.tensors[s] for m in modules for s in _natural_order(tuple(m.tensors))]
        return Plan(self.recipe, self.base, self.sources, self.info, self.parallel, self.layout, modules, tensors,
                    units, *side_files(self.recipe, self.sources))


def side_files(recipe: Recipe, sources: dict[str, Source]) -> tuple[dict[str, Path], str | None]:
    """The side files the output gets (name → file) and what build says of them. The base's; where the base has no
    tokenizer (a model saved by a training run often has none; llm-compressor and gptqmodel save one beside their
    output), every side file it lacks comes from the first source with a tokenizer in recipe.side_file_order, all
    from one. None anywhere: the output has none, and SGLang's server cannot start without one."""
    base = sources[BASE].ckpt
    files = {f: base.path / f for f in base.side_files}
    if tokenizer_among(files):
        return files, None
    for label in recipe.side_file_order():
        ck = sources[label].ckpt
        if label != BASE and tokenizer_among(ck.side_files):
            # (not the code the source's config.json names: the output's config is the base's)
            tokenizer_code = auto_map_modules(loose_json(ck.path / "tokenizer_config.json"))
            taken = [f for f in ck.side_files if f not in files and (not f.endswith(".py") or f in tokenizer_code)]
            files.update((f, ck.path / f) for f in taken)
            return files, (f"note: the base has no tokenizer; {', '.join(taken)} taken from source {label!r} "
                           f"({ck.path})")
    return files, (f"warning: neither the base nor any source has a tokenizer ({', '.join(TOKENIZER_FILES)}), and "
                   f"SGLang's server cannot start without one: put the model's tokenizer files in the base "
                   f"({base.path}) and build again, or serve with `-- --tokenizer-path DIR`")


@lru_cache(maxsize=4096)  # asked per module (45k in a DeepSeek-V3-sized job) for a handful of distinct schemes
def repack_target(stored: Scheme, layout: str) -> Scheme | None:
    """The scheme a module stored in `stored` is repacked into for this layout, or None (written as stored)."""
    return FORMATS[stored.format].repack(stored.params, layout)


@lru_cache(maxsize=4096)
def written_scheme(stored: Scheme, model_type: str, layout: str = MP_LAYOUT) -> Scheme:
    """The scheme a module stored in `stored` is written in: its lossless repack's, or its own after any exact
    rewrite (Format.output_params). Build and plan both ask this."""
    target = repack_target(stored, layout)
    if target is not None:
        return target
    fmt = FORMATS[stored.format]
    return Scheme.of(stored.format, **fmt.output_params(stored.params, model_type, layout))


@lru_cache(maxsize=4096)
def _written_suffixes(stored: Scheme, suffixes: tuple[str, ...], model_type: str, layout: str) -> tuple:
    """(stored suffix, written suffix, rewrite name, rewrite) for each of a module's tensors, in suffix order: the
    same for every module of one scheme (asked 45k times in a DeepSeek-V3-sized job)."""
    fmt, params = FORMATS[stored.format], stored.params
    out = []
    for suffix in sorted(suffixes):
        rw_name, rw = fmt.rewrite(suffix, params) or (None, None)
        out.append((suffix, fmt.output_suffix(suffix, params, model_type, layout), rw_name, rw))
    return tuple(out)


@lru_cache(maxsize=4096)
def _natural_order(suffixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(suffixes, key=natural_key))


def written_nbytes(view, out_f: int, in_f: int, layout: str = MP_LAYOUT) -> int:
    """Bytes a module stored as `view` takes once written (a repack's layout differs from the stored one)."""
    target = repack_target(view.scheme, layout)
    if target is None:
        return sum(t.nbytes for t in view.tensors.values())
    n = sum(nbytes_of(dtype, shape) for _, _, dtype, shape in repack_layout(view, target, out_f, in_f).values())
    return n + (view.tensors["bias"].nbytes if "bias" in view.tensors else 0)


def repack_layout(view, target: Scheme, out_f: int, in_f: int) -> dict[str, tuple]:
    """A repacked module's written tensors: suffix → (the stored suffix it comes from or None, that stored tensor,
    dtype, shape) — the target format's layout, keeping the stored float dtype of scales."""
    fmt = FORMATS[view.scheme.format]
    out = {}
    for suffix, e in sorted(FORMATS[target.format].expected(target.params, out_f, in_f).items()):
        origin = fmt.repack_from.get(suffix)
        stored = view.tensors.get(origin) if origin else None
        dtype = stored.dtype if stored is not None and stored.dtype in e.dtypes else e.dtypes[0]
        out[suffix] = (origin, stored, dtype, e.shape)
    return out


def _refuse(problem: str | None) -> None:
    if problem is not None:
        raise UserError(problem)


def _raise_first(problems: list[rules.Problem]) -> None:
    if problems:
        raise UserError(problems[0].message)


def _check_unquantized(src: Source, label: str, name: str, role: Role) -> None:
    fmt = src.modules[name].scheme.format
    if fmt != "unquantized":
        raise UserError(f"source {label!r} quantized the {role.kind} {name} ({fmt}); SGLang keeps {role.kind}s "
                        f"unquantized (no quant method there), so it cannot be served — re-export that source with "
                        f"it ignored (llm-compressor: ignore=['re:.*{name.rsplit('.', 1)[-1]}$'])")


def make_plan(recipe: Recipe, parallel: rules.Parallel = rules.Parallel(), layout: str = MP_LAYOUT) -> Plan:
    parallel.check()
    if layout not in LAYOUTS:
        raise UserError(f"--to {layout!r}: choose one of {', '.join(LAYOUTS)}")
    forget_open_files()  # sources may have changed since an earlier operation in this process
    return _Planner(recipe, parallel, layout).plan()

