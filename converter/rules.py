"""The rules a mixed checkpoint must keep to be served right, in one place for build (on its plan) and verify (on
the manifest): both describe their linear modules as `Linear`s and get structured `Problem`s back.

- fused units: SGLang runs one kernel per fused layer (qkv, gate_up, MLA q_a+kv_a, a MoE layer's experts), so its
  parts share one scheme; a MoE layer may hold several schemes per expert (mixed experts), each expert one, never
  with a folded-scale format (its norm is every expert's input).
- folded scales: AWQ folds o_proj's input scales into v_proj and down_proj's into up_proj — such pairs stay in one
  source; a norm taken from a source other than the base goes with every module that reads it.
- partitions (SGLang 0.5.17's rules, layers/linear.py, moe/fused_moe_triton/layer.py): attention heads over TP; the
  experts over EP ranks and their intermediate size over moe_tp = tp / ep; each fused layer as a rank holds it must
  fit its format's native kernel (Format.kernel_problem) — at TP=1 as well (a fused qkv of 576 outputs is not whole
  FP8 blocks of 128 at any TP).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from .errors import UserError
from .formats import FORMATS, Scheme
from .layout import UNQUANTIZED_ONLY_SLOTS, ModelInfo, Role

# the order of a fused unit's parts as SGLang stacks them (its last part is the one compressed-tensors' block-FP8 check
# exempts at TP=1)
SLOT_ORDER = {s: i for i, s in enumerate(("q", "k", "v", "q_a_proj", "kv_a_proj_with_mqa", "gate", "up", "w1", "w3"))}


@dataclass(frozen=True)
class Linear:
    """What the rules need to know of one linear module, from a plan or from a manifest."""
    name: str
    role: Role
    scheme: Scheme
    source: str
    why: str  # the rule that chose its source (for messages)
    out_features: int
    in_features: int
    bias: bool = False  # it carries a bias tensor

    def describe(self) -> str:
        return f"{self.name.rsplit('.', 1)[-1]}={self.scheme.describe()} from {self.source!r} via {self.why}"


@dataclass(frozen=True)
class Problem:
    rule: str  # fused-unit | expert | folded-scales | heads | experts | partition | kernel
    where: str  # the module or unit
    message: str  # one line, with the fix


def describe_schemes(members: list[Linear]) -> str:
    """One example module per scheme."""
    by: dict[Scheme, Linear] = {}
    for m in members:
        by.setdefault(m.scheme, m)
    return "; ".join(m.describe() for m in by.values())


# ---- fused units -------------------------------------------------------------------------------------------------
def by_unit(linears: list[Linear]) -> dict[str, list[Linear]]:
    units: dict[str, list[Linear]] = {}
    for m in linears:
        units.setdefault(m.role.unit, []).append(m)
    return units


def unit_problems(unit: str, members: list[Linear]) -> list[Problem]:
    """One scheme per fused unit; in a MoE layer one scheme per expert and no folded-scale format among several."""
    schemes = {m.scheme for m in members}
    if members[0].role.slot in UNQUANTIZED_ONLY_SLOTS and any(s.format != "unquantized" for s in schemes):
        m = members[0]
        return [Problem("unquantized-only", unit, f"{m.name} is {m.scheme.describe()} from {m.source!r} via {m.why}; "
                                                  f"SGLang's NextN (MTP) draft model builds it as a plain torch Linear "
                                                  f"with no quant method — take it unquantized (a rule `match: "
                                                  f"{m.name.rsplit('.', 1)[-1]}` with `source: base`)")]
    if len(schemes) == 1:
        return []
    if members[0].role.expert is None:
        return [Problem("fused-unit", unit, f"fused unit {unit} mixes formats ({describe_schemes(members)}); SGLang "
                                            f"runs one kernel per fused unit — assign all its parts to sources of "
                                            f"one format")]
    problems = []
    for e, ms in sorted(experts_of(members).items()):
        if len({m.scheme for m in ms}) > 1:
            problems.append(Problem("expert", unit, f"expert {e} of {unit} mixes formats ({describe_schemes(ms)}); an "
                                                    f"expert's gate, up and down projections run in one fused-MoE "
                                                    f"call — give the whole expert one format (match "
                                                    f"\"mlp.experts.*\" with experts: [...])"))
    for m in members:
        why = FORMATS[m.scheme.format].expert_group_problem
        if why:
            problems.append(Problem("expert", unit, f"{unit} mixes formats across its experts and takes {m.name} "
                                                    f"from {m.source!r} ({m.scheme.describe()}): {why} — give this "
                                                    f"layer's experts one format, or mix only FP8, Int8, GPTQ and "
                                                    f"bf16 experts"))
            break
    for m in members:
        if FORMATS[m.scheme.format].folds(m.scheme.params):
            problems.append(Problem(
                "expert", unit,
                f"{unit} mixes formats across its experts ({describe_schemes(members)}) and takes {m.name} from "
                f"{m.source!r} ({m.scheme.format}), a folded-scale source: it folded activation scales into the norm "
                f"that the router and every expert of this layer read, so the other experts would see inputs scaled "
                f"for its weights — take all of this layer's experts from {m.source!r}, or mix only formats that "
                f"leave the norm alone (FP8, Int8, GPTQ, bf16)"))
            break
    return problems


def experts_of(members: list[Linear]) -> dict[int, list[Linear]]:
    out: dict[int, list[Linear]] = {}
    for m in members:
        out.setdefault(m.role.expert, []).append(m)
    return out


def expert_groups(members: list[Linear]) -> list[tuple[Scheme, list[int]]]:
    """A mixed-experts layer's groups: (scheme, its expert ids ascending), in order of each scheme's first expert."""
    groups: dict[Scheme, list[int]] = {}
    for e, ms in sorted(experts_of(members).items()):
        groups.setdefault(ms[0].scheme, []).append(e)
    return list(groups.items())


# ---- biases ------------------------------------------------------------------------------------------------------
def bias_problems(linears: list[Linear]) -> list[Problem]:
    """A bias on every part of a fused unit or on none, and on the same module in every layer (every expert) or in
    none. SGLang builds each kind of layer's bias from the config, alike in every layer, and a fused unit's (q/k/v,
    gate/up) as one parameter; it loads what the checkpoint gives and leaves the rest uninitialized — a q_proj whose
    bias went missing is served with garbage in its slice of qkv_proj's bias, and verify --numeric (which starts from
    the base's weights) cannot see it."""
    biased = [m for m in linears if m.bias]
    if not biased:
        return []
    in_unit = {m.role.unit: m for m in biased if m.role.expert is None}
    of_kind = {_kind(m): m for m in biased}
    problems = []
    for m in linears:
        if m.bias:
            continue
        other = in_unit.get(m.role.unit) if m.role.expert is None else None
        if other is not None:
            problems.append(Problem("bias", m.name, f"{m.name} has no bias but {other.name} has one: SGLang fuses "
                                                    f"them into {m.role.unit} with one bias, whose slice for "
                                                    f"{m.name.rsplit('.', 1)[-1]} would stay uninitialized — a "
                                                    f"tensor is missing; take the module from a source that has it"))
            continue
        other = of_kind.get(_kind(m))
        if other is not None:
            problems.append(Problem("bias", m.name, f"{m.name} has no bias but {other.name}, the same module "
                                                    f"elsewhere, has one: SGLang builds every layer's bias alike and "
                                                    f"would leave this one uninitialized — a tensor is missing; take "
                                                    f"the module from a source that has it"))
    return problems


def _kind(m: Linear) -> tuple[str, str | None]:
    """The same module in every layer (and every expert): its unit without the layer number, and its slot."""
    unit = m.role.unit if m.role.layer is None else m.role.unit.replace(f"layers.{m.role.layer}.", "layers.*.", 1)
    return unit, m.role.slot


# ---- folded scales -----------------------------------------------------------------------------------------------
def fold_pairs(linears: list[Linear]) -> dict[str, dict[str, Linear]]:
    """pair key → {"producer": linear, "consumer": linear}: the linears between which a folded-scale producer may
    move a scale (layout's Role.pair: v_proj→o_proj, up_proj→down_proj, an expert's w3→w2)."""
    pairs: dict[str, dict[str, Linear]] = {}
    for m in linears:
        if m.role.pair:
            pairs.setdefault(m.role.pair[0], {})[m.role.pair[1]] = m
    return pairs


def pair_problems(linears: list[Linear]) -> list[Problem]:
    """AWQ folds o_proj's input scales into v_proj and down_proj's into up_proj: such pairs travel together (where
    the shapes allow the fold: not GQA's v→o)."""
    problems = []
    for p in fold_pairs(linears).values():
        prod, cons = p.get("producer"), p.get("consumer")
        if not prod or not cons or prod.source == cons.source or prod.out_features != cons.in_features:
            continue
        folder = next((m for m in (prod, cons) if FORMATS[m.scheme.format].folds(m.scheme.params)), None)
        if folder:
            problems.append(Problem(
                "folded-scales", cons.name,
                f"folded scales: {cons.name} comes from {cons.source!r} via {cons.why} but {prod.name} from "
                f"{prod.source!r} via {prod.why}; {folder.source!r} ({folder.scheme.format}) folds "
                f"{cons.name.rsplit('.', 1)[-1]}'s input scales into {prod.name.rsplit('.', 1)[-1]} — take both "
                f"from the same source"))
    return problems


def readers_of(supports: dict[str, Role], linears: list[Linear], norm_of: dict[tuple[int, str], str]
               ) -> dict[str, list[Linear]]:
    """Each norm and router of `supports` (module → role) → the linears whose folded scales live in it: a norm's, the
    linears of every stage that reads it (`norm_of`: layout.stage_norms — a parallel block's input_layernorm is read
    by attention and the MLP); a router's, its layer's MLP (a folded-scale producer balances the router with the
    experts)."""
    by_stage: dict[tuple, list[Linear]] = {}
    for m in linears:
        if m.role.stage is not None:
            by_stage.setdefault((m.role.layer, m.role.stage), []).append(m)
    out: dict[str, list[Linear]] = {}
    for key, norm in norm_of.items():
        out.setdefault(norm, []).extend(by_stage.get(key, ()))
    for name, role in supports.items():
        if role is not None and role.kind == "router" and role.stage:
            out[name] = by_stage.get((role.layer, role.stage), [])
    return out


def norm_problems(norm: str, role: Role, source: str, readers: list[Linear]) -> list[Problem]:
    """A norm (or router) taken from a source other than the base carries that source's folded scales: every
    module reading it must come from that source."""
    if source == "base":
        return []
    return [Problem("folded-scales", norm, f"{norm} comes from {source!r} (folded scales) but its consumer {c.name} "
                                           f"comes from {c.source!r}; assign them together")
            for c in readers if c.source != source]


# ---- architecture-specific loaders --------------------------------------------------------------------------------
# DeepSeek (MLA) loaders special-case the model's quant config: after loading they absorb kv_b_proj into w_kc/w_vc
# (FP8 through `quant_config.linear_fp8_config.weight_block_size`, one layout for the whole model; int8 per channel;
# anything with a `qweight` as AWQ), and they concatenate q_a_proj + kv_a_proj_with_mqa along dim 1 only when the
# model's config is AWQ (SGLang 0.5.17 models/deepseek_v2.py).
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2")
_MLA_NO_PACKED = ("self_attn.kv_b_proj", "self_attn.fused_qkv_a_proj_with_mqa")


def mla_problems(linears: list[Linear], model_type: str) -> list[Problem]:
    if model_type not in MLA_MODEL_TYPES:
        return []
    problems = []
    for unit, members in by_unit(linears).items():
        m = members[0]
        if unit.endswith(_MLA_NO_PACKED) and m.scheme.format in ("gptq", "awq"):
            problems.append(Problem("mla", unit, f"{unit} is {m.scheme.format} (from {m.source!r} via {m.why}) in a "
                                                 f"{model_type} model; SGLang's MLA loader decodes packed int4 there "
                                                 f"only for a whole-model AWQ config (kv_b_proj absorption, fused "
                                                 f"q_a/kv_a concatenation), so it would load wrong — take the MLA "
                                                 f"projections from an FP8, Int8 or bf16 source"))
    blocks = mla_fp8_blocks(linears, model_type)
    if len(blocks) > 1:
        problems.append(Problem("mla", "kv_b_proj", f"the kv_b_proj layers use different FP8 layouts (blocks "
                                                    f"{sorted(blocks, key=str)}); SGLang's MLA loader takes one for "
                                                    f"the whole model — take them from one FP8 source"))
    return problems


# Formats of kv_b_proj that SGLang 0.5.17's DeepSeek loader dequantizes and absorbs into w_kc / w_vc in bfloat16
# (models/deepseek_common/deepseek_weight_loader.py post_load_weights: block_quant_dequant(…, torch.bfloat16), Int8
# `.to(torch.bfloat16)`; other FP8 layouts go through bmm_fp8 with a bfloat16 output), which the first forward meets
# with activations of the model's dtype: in float16, "expected scalar type Half but found BFloat16" (an H100,
# 2026-12-06)
MLA_ABSORBED_IN_BF16 = ("fp8", "int8")


def expert_placement_problem(unit: str, moe_settings) -> str | None:
    """A mixed-experts layer holds each format's experts in a group layer of its own, placed as SGLang places experts
    by default (expert e on EP rank e // (experts / ep), physical id = logical id). EPLB, redundant experts and an
    --init-expert-location move experts between ranks and slots, which those groups do not follow. `moe_settings`:
    anything with SGLang's enable_eplb, ep_num_redundant_experts and init_expert_location (its launch arguments, or
    its server args' moe group) — one rule for `serve` and the shim."""
    moved = [flag for flag, on in (
        ("--enable-eplb", getattr(moe_settings, "enable_eplb", False)),
        ("--ep-num-redundant-experts", getattr(moe_settings, "ep_num_redundant_experts", 0)),
        ("--init-expert-location", getattr(moe_settings, "init_expert_location", "trivial") != "trivial")) if on]
    if not moved:
        return None
    return (f"{unit} mixes formats across its experts, in groups that keep SGLang's default expert placement; "
            f"{' and '.join(moved)} {'move' if len(moved) > 1 else 'moves'} experts — leave "
            f"{'them' if len(moved) > 1 else 'it'} out, or take this layer's experts from one source")


def shared_experts_of(units, experts: str) -> list[str]:
    """The units of the shared experts beside MoE layer `experts` (a unit name ending `.mlp.experts`): DeepSeek's and
    GLM's `shared_experts.*`, Qwen-MoE's one `shared_expert.*`."""
    mlp = experts[:-len("experts")]
    return [u for u in units if u.startswith((mlp + "shared_experts.", mlp + "shared_expert."))]


def shared_experts_fusion_problem(units, experts: str) -> str | None:
    """Why the shared experts of MoE layer `experts` must not be fused into it, or None. SGLang fuses a layer's shared
    experts into its FusedMoE as extra experts on a GPU (GLM-4.5 at any size, DeepSeek-V3/R1 at 256 routed experts; a
    Qwen-MoE's one `shared_expert` in Qwen3-Next, or on AMD) and loads them through the routed experts' quant method:
    right only where the shared experts have the routed experts' one scheme. Otherwise a shared expert's scales meet
    the routed scheme's parameters — a crash at load, or, where the shapes agree (Int8 bytes in an FP8 slot), wrong
    values without an error. `units`: the manifest's (one rule for the shim, which turns fusion off, and verify
    --engine, which checks what SGLang fused)."""
    spec, shared = units[experts], shared_experts_of(units, experts)
    if shared and spec.groups:
        return f"{experts} mixes formats across its experts"
    for u in shared:
        if units[u].schemes() != spec.schemes():
            return f"{u} is {units[u].describe()} where the routed experts are {spec.describe()}"
    return None


def model_dtypes(unit: str, fmt: str, model_type: str, moe: bool) -> tuple[str, ...]:
    """The model dtypes (SGLang's --dtype) in which SGLang 0.5.17 runs this unit in this format, or () for any: a
    MoE layer's, its format's kernel's (Format.moe_model_dtypes); an MLA kv_b_proj absorbed in bfloat16, bfloat16."""
    if moe:
        return FORMATS[fmt].moe_model_dtypes
    if model_type in MLA_MODEL_TYPES and unit.endswith("self_attn.kv_b_proj") and fmt in MLA_ABSORBED_IN_BF16:
        return ("bfloat16",)
    return ()


def dtype_problems(linears: list[Linear], model_type: str) -> list[Problem]:
    """A model that SGLang can run in no dtype: two of its units each run in dtypes the other does not (GPTQ MoE
    experts in float16 only, an FP8 kv_b_proj absorbed in bfloat16)."""
    first: dict[tuple[str, ...], Linear] = {}
    for unit, members in by_unit(linears).items():
        for m in members:
            dtypes = model_dtypes(unit, m.scheme.format, model_type, m.role.expert is not None)
            if dtypes:
                first.setdefault(dtypes, m)
    for (a, ma), (b, mb) in itertools.combinations(first.items(), 2):
        if not set(a) & set(b):
            return [Problem("dtype", mb.role.unit,
                            f"no model dtype serves this mix in SGLang 0.5.17: {ma.role.unit} ({ma.scheme.format} from "
                            f"{ma.source!r} via {ma.why}) runs in {' or '.join(a)} only, {mb.role.unit} "
                            f"({mb.scheme.format} from {mb.source!r} via {mb.why}) in {' or '.join(b)} only — take "
                            f"one of them from another source (a bf16 kv_b_proj runs in either dtype; FP8, Int8 and "
                            f"AWQ experts too)")]
    return []


def mla_fp8_blocks(linears: list[Linear], model_type: str) -> set:
    """The FP8 block layouts (None: per tensor/channel) of an MLA model's kv_b_proj layers."""
    if model_type not in MLA_MODEL_TYPES:
        return set()
    return {tuple(m.scheme.params["block"] or ()) or None for m in linears
            if m.name.endswith("kv_b_proj") and m.scheme.format == "fp8"}


# ---- partitions and kernel shapes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parallel:
    """The parallel sizes SGLang is launched with, as build, verify and plan take them and the manifest records them
    (built_for_*): --tp, --ep, DP attention's --dp, and --moe-dense-tp-size (None: not given); and verify's
    --enable-dp-lm-head, which moves no split a check sees (the lm_head is vocab-parallel, padded per rank), only
    bytes per rank. One value, so that each rule that reads a size (the checks below, ranks_splitting, the flags a
    message names) reads it from one place."""
    tp: int = 1
    ep: int = 1
    dp: int = 1
    dense_tp: int | None = None
    dp_lm_head: bool = False

    def check(self) -> Parallel:
        """The sizes as SGLang 0.5.17 accepts them at all (before any split is computed with them)."""
        if not (1 <= self.tp <= 4096 and 1 <= self.ep <= 4096 and 1 <= self.dp <= 4096):
            raise UserError(f"--tp, --ep and --dp must be between 1 and 4096 (got {self.flags(every=True)})")
        if self.dense_tp is not None and self.dense_tp not in (1, self.tp):
            raise UserError(f"--moe-dense-tp-size {self.dense_tp}: SGLang 0.5.17 takes only 1 or the --tp size "
                            f"({self.tp}) (server_args.py); pass 1 to keep the dense MLP layers whole on every rank, "
                            f"or leave it out")
        if self.dp_lm_head and self.dp == 1:
            raise UserError("--enable-dp-lm-head splits the lm_head over the attention group of DP attention; SGLang "
                            "0.5.17 refuses it without (arg_groups/overrides.py) — add --dp N, or leave it out")
        return self

    def flags(self, every: bool = False) -> str:
        """As on SGLang's command line (--ep and --dp only when not 1, unless every)."""
        return (f"--tp {self.tp}" + (f" --ep {self.ep}" if every or self.ep > 1 else "")
                + (f" --dp {self.dp}" if every or self.dp > 1 else "")
                + (f" --moe-dense-tp-size {self.dense_tp}" if self.dense_tp is not None else "")
                + (" --enable-dp-lm-head" if self.dp_lm_head else ""))

    def named(self) -> dict[str, int | bool]:
        """tp, ep, dp (when above 1), moe_dense_tp (when given), dp_lm_head (when set: verify only): the manifest's
        built_for_* fields and the reports' keys."""
        return {"tp": self.tp, "ep": self.ep, **({"dp": self.dp} if self.dp > 1 else {}),
                **({"moe_dense_tp": self.dense_tp} if self.dense_tp is not None else {}),
                **({"dp_lm_head": True} if self.dp_lm_head else {})}

    def spelled(self, prefix: str = "") -> str:
        """named() as reports write it: `tp=8 ep=8 dp=2` (prefix "built_for_": a manifest's claim)."""
        return " ".join(f"{prefix}{k}={v}" for k, v in self.named().items())

    def ranks_splitting(self, role, model_type: str) -> int:
        """Over how many ranks SGLang splits a module that is not a routed expert (column, row or vocab parallel):
        the attention group (tp / dp) under DP attention (the lm_head too under --enable-dp-lm-head: ParallelLMHead's
        use_attn_tp_group in every model here), one rank for DeepSeek's dense MLPs under --moe-dense-tp-size 1, else
        every TP rank."""
        if self.dp > 1 and (in_attention_group(role) or (self.dp_lm_head and role.slot == "lm_head")):
            return max(1, self.tp // self.dp)
        if self.dense_tp == 1 and model_type in DENSE_TP_MODEL_TYPES and is_dense_mlp(role):
            return 1
        return self.tp


# Model types whose SGLang 0.5.17 model splits attention over attn_tp = tp / dp under --enable-dp-attention --dp dp
# (models/deepseek_v2.py, qwen3.py, qwen2_moe.py and qwen3_moe.py build attention with get_parallel().attn_tp_size,
# as layers/dp_attention.compute_dp_attention_world_info sets it); llama.py, qwen2.py and mixtral.py split attention
# over the whole TP group whatever --dp says. Everything else (MLPs, shared experts, routed experts) keeps its split.
DP_ATTENTION_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "qwen2_moe", "qwen3",
                            "qwen3_moe")


def in_attention_group(role) -> bool:
    """Whether SGLang splits this module over the attention group (attn_tp = tp / dp ranks) under DP attention:
    attention, and the input embedding (VocabParallelEmbedding with use_attn_tp_group). Everything else keeps tp."""
    return ".self_attn." in role.unit or role.kind == "embedding"


# Model types whose dense MLP layers SGLang 0.5.17 keeps whole on every rank under --moe-dense-tp-size 1
# (models/deepseek_v2.py: DeepseekV2MLP with tp_size=1 when layers/communicator.enable_moe_dense_fully_dp()); the
# shared and routed experts keep their splits. Other models ignore the flag.
DENSE_TP_MODEL_TYPES = MLA_MODEL_TYPES


def is_dense_mlp(role) -> bool:
    """A decoder layer's dense MLP (DeepSeek's first layers), not a MoE layer's shared or routed experts."""
    return role.expert is None and ".mlp." in role.unit and ".shared_experts." not in role.unit


def partition_problems(linears: list[Linear], info: ModelInfo, parallel: Parallel) -> list[Problem]:
    """Every split SGLang makes at these sizes (attention over attn_tp = tp / dp ranks, experts over ep ranks and
    their intermediate size over tp / ep, DeepSeek's dense MLPs whole under --moe-dense-tp-size 1, everything else
    over tp: Parallel.ranks_splitting), and every fused layer as one rank holds it, checked against its format's
    native kernel."""
    tp, ep, dp = parallel.tp, parallel.ep, parallel.dp
    flag = parallel.flags()
    problems = []
    if dp > 1 and info.model_type not in DP_ATTENTION_MODEL_TYPES:
        problems.append(Problem("dp", "model", f"{flag}: SGLang 0.5.17's {info.model_type} model has no DP attention "
                                               f"(it splits attention over all --tp ranks); drop --dp"))
    if tp % dp:
        problems.append(Problem("dp", "model", f"{flag}: DP attention splits attention over tp / dp ranks; --tp must "
                                               f"be a multiple of --dp"))
    if problems:
        return problems
    attn_tp = tp // dp
    if info.num_heads % attn_tp:
        problems.append(Problem("heads", "model", f"{flag}: num_attention_heads={info.num_heads} is not divisible "
                                                  f"by {attn_tp}"))
    if info.num_kv_heads % attn_tp and attn_tp % info.num_kv_heads:
        problems.append(Problem("heads", "model", f"{flag}: num_key_value_heads={info.num_kv_heads} neither divides "
                                                  f"nor is divisible by {attn_tp}"))
    if ep > 1 and tp % ep:
        problems.append(Problem("experts", "model", f"{flag}: SGLang splits experts over the TP ranks; --tp must be a "
                                                    f"multiple of --ep"))
    if ep > 1 and info.num_experts % ep:
        problems.append(Problem("experts", "model", f"{flag}: {info.num_experts} experts cannot be split evenly over "
                                                    f"{ep} ranks"))
    if problems:
        return problems
    for unit, members in by_unit(linears).items():
        role = members[0].role
        if role.expert is not None:
            problems += _expert_unit(unit, members, tp, ep, flag)
            continue
        ranks = parallel.ranks_splitting(role, info.model_type)
        dp_fix = ", DP attention (--dp)" if in_attention_group(role) and info.model_type in DP_ATTENTION_MODEL_TYPES \
            else ""
        problems += _dense_unit(unit, members, info, ranks, flag, dp_fix)
    return problems


def _kernel(unit: str, m: Linear, flag: str, tp: int, split: tuple, whole: tuple, dp_fix: str = "") -> list[Problem]:
    """The format's kernel_problem for the layer as one rank holds it (`split`: kernel_problem's arguments); `whole`:
    the same layer unsplit — when that fails too, no smaller --tp helps (a split only divides sizes), and the fix
    says so."""
    fmt = FORMATS[m.scheme.format]
    problem = fmt.kernel_problem(m.scheme.params, *split)
    if not problem:
        return []
    prefix = f"{flag}: " if tp > 1 else ""
    fix = f"use a smaller --tp{dp_fix} or another format for this module" \
        if tp > 1 and fmt.kernel_problem(m.scheme.params, *whole) is None else \
        "SGLang cannot serve it in this format at any TP; take it from another format"
    return [Problem("kernel", unit, f"{prefix}{unit} ({m.scheme.describe()} from {m.source!r} via {m.why}): "
                                    f"{problem}; {fix}")]


def _dense_unit(unit: str, members: list[Linear], info: ModelInfo, tp: int, flag: str,
                dp_fix: str = "") -> list[Problem]:
    """A dense unit split over `tp` ranks (attention's: tp / dp under DP attention)."""
    members = sorted(members, key=lambda m: SLOT_ORDER.get(m.role.slot, 0))
    first = members[0]
    parallel = first.role.parallel
    if parallel not in ("column", "row", "replicated"):
        return []  # vocab-parallel heads: SGLang pads the vocabulary per rank
    out_parts, problems = [], []
    for m in members:
        ways = (min(tp, info.num_kv_heads) if m.role.slot in ("k", "v") else tp) if parallel == "column" else 1
        if m.out_features % ways:
            problems.append(Problem("partition", m.name, f"{flag}: {m.name} has {m.out_features} outputs, not "
                                                         f"divisible by {ways}"))
        out_parts.append(m.out_features // ways)
    in_ways = tp if parallel == "row" else 1
    if first.in_features % in_ways:
        problems.append(Problem("partition", first.name, f"{flag}: {first.name} has {first.in_features} inputs, not "
                                                         f"divisible by {tp}"))
    if problems:
        return problems
    return _kernel(unit, first, flag, tp, (out_parts, first.in_features // in_ways, first.in_features,
                                           tp > 1 and parallel == "column", tp > 1 and parallel == "row", False),
                   ([m.out_features for m in members], first.in_features, first.in_features, False, False, False),
                   dp_fix=dp_fix)


def _expert_unit(unit: str, members: list[Linear], tp: int, ep: int, flag: str) -> list[Problem]:
    """Each scheme of the layer (one, or a mixed layer's groups) on one of its experts: gate/up as [I, I] by the
    hidden size, down as the hidden size by I, with I split over moe_tp = tp / ep. SGLang's block-FP8 MoE checks
    read the global TP size (split_in is tp > 1)."""
    moe_tp = tp // ep
    problems, by_expert = [], experts_of(members)
    for scheme, experts in expert_groups(members):
        parts = {m.role.slot: m for m in by_expert[experts[0]]}
        gate, down = parts.get("w1") or parts.get("w3"), parts.get("w2")
        if gate is None or down is None:
            continue
        inter, hidden = gate.out_features, gate.in_features
        if inter % moe_tp:
            problems.append(Problem("partition", unit, f"{flag}: {unit}'s expert intermediate size {inter} is not "
                                                       f"divisible by moe_tp = {moe_tp}"))
            continue
        ip = inter // moe_tp
        problems += _kernel(unit, gate, flag, tp, ([ip, ip], hidden, hidden, moe_tp > 1, False, True),
                            ([inter, inter], hidden, hidden, False, False, True)) or \
            _kernel(unit, down, flag, tp, ([hidden], ip, inter, False, tp > 1, True),
                    ([hidden], inter, inter, False, False, True))
    return problems
