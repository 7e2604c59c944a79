"""What mpconvert knows about decoder-model architectures: module roles, SGLang's fused units, folded-scale coupling.

SGLang fuses q/k/v into `qkv_proj`, gate/up into `gate_up_proj` (DeepSeek: q_a + kv_a → `fused_qkv_a_proj_with_mqa`)
and stacks every routed expert of a layer into one FusedMoE (`…mlp.experts`). One quant method serves a fused unit,
so a unit is the smallest thing that can have a format. Folded-scale producers (AWQ, SmoothQuant) fold activation
scales into the op *before* a linear: the norm before qkv / gate_up / router+experts, v_proj before o_proj, up_proj
before down_proj. Those pairs must come from the same source.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, NamedTuple

from .errors import UserError, and_more
from .recipe import format_ids

_LAYER_NUMBER = re.compile(r"(?:model\.|language_model\.model\.)?layers\.(\d+)\.")
LAYER_PREFIX = re.compile(r"(?:model\.|language_model\.model\.)?layers\.\d+\.")  # a decoder layer's module prefix
_L = r"(?P<pfx>(?:model\.|language_model\.model\.)?layers\.(?P<layer>\d+)\.)"
_MOE = r"(?P<moe>mlp|block_sparse_moe)"


class Role(NamedTuple):
    """What one module is. `unit` is SGLang's layer prefix that holds it; `parallel` how TP splits it. (A named
    tuple, immutable and hashable: made for every module — 45k in a DeepSeek-V3-sized job — at a third of a frozen
    dataclass's cost.)"""

    kind: str  # linear | norm | router | embedding
    unit: str
    parallel: str = "replicated"  # column | row | replicated | vocab
    layer: int | None = None
    stage: str | None = None  # attn_in | mlp_in: whose input norm it consumes (folded scales)
    pair: tuple[str, str] | None = None  # (pair id, "producer"|"consumer") for v→o and up→down folding
    expert: int | None = None
    slot: str = ""  # position inside a fused unit: q/k/v, gate/up/down (w1/w3/w2), …


def _rx(p: str) -> re.Pattern:
    return re.compile(p)  # used with fullmatch: `$` would match before a trailing newline


def _routed_expert(m: re.Match) -> Role:
    pfx, moe, layer, e, p = m.group("pfx", "moe", "layer", "e", "p")
    slot = _EXPERT_SLOT.get(p, p)  # w1 (gate), w3 (up), w2 (down)
    return Role("linear", pfx + moe + ".experts", "row" if slot == "w2" else "column", int(layer),
                None if slot == "w2" else "mlp_in",
                None if slot == "w1" else (f"{pfx}experts.{e}.updown", "consumer" if slot == "w2" else "producer"),
                int(e), slot)


_EXPERT_SLOT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


# (regex, builder) — first match wins. Builders take the match and return a Role. Routed experts come first: they
# are most of a MoE model's modules (41k of 45k in DeepSeek-V3), and no other rule matches their names.
_RULES: list[tuple[re.Pattern, object]] = [
    (_rx(_L + _MOE + r"\.experts\.(?P<e>\d+)\.(?P<p>gate_proj|up_proj|down_proj|w1|w2|w3)"), _routed_expert),
    (_rx(_L + r"self_attn\.(?P<p>q|k|v)_proj"), lambda m: Role(
        "linear", m["pfx"] + "self_attn.qkv_proj", "column", int(m["layer"]), "attn_in",
        (m["pfx"] + "vo", "producer") if m["p"] == "v" else None, slot=m["p"])),
    (_rx(_L + r"self_attn\.o_proj"), lambda m: Role(
        "linear", m[0], "row", int(m["layer"]), None, (m["pfx"] + "vo", "consumer"), slot="o")),
    (_rx(_L + r"self_attn\.(?P<p>q_a_proj|kv_a_proj_with_mqa)"), lambda m: Role(
        "linear", m["pfx"] + "self_attn.fused_qkv_a_proj_with_mqa", "replicated", int(m["layer"]), "attn_in",
        slot=m["p"])),
    (_rx(_L + r"self_attn\.(?P<p>q_b_proj|kv_b_proj)"), lambda m: Role(
        "linear", m[0], "column", int(m["layer"]), None, slot=m["p"])),
    (_rx(_L + r"(?P<mlp>mlp(?:\.shared_experts?)?)\.(?P<p>gate|up)_proj"), lambda m: Role(
        "linear", m["pfx"] + m["mlp"] + ".gate_up_proj", "column", int(m["layer"]), "mlp_in",
        (m["pfx"] + m["mlp"] + ".updown", "producer") if m["p"] == "up" else None, slot=m["p"])),
    (_rx(_L + r"(?P<mlp>mlp(?:\.shared_experts?)?)\.down_proj"), lambda m: Role(
        "linear", m[0], "row", int(m["layer"]), None, (m["pfx"] + m["mlp"] + ".updown", "consumer"), slot="down")),
    (_rx(_L + r"(?:" + _MOE + r"\.gate|mlp\.shared_expert_gate)"), lambda m: Role(
        "router", m[0], "replicated", int(m["layer"]), "mlp_in")),
    # DeepSeek-V3's multi-token-prediction (MTP) layer: model.layers.{num_hidden_layers} holds a whole decoder layer
    # (the rules above and below) and these; SGLang's NextN draft model loads them as model.eh_proj (a plain torch
    # Linear), model.enorm/hnorm/shared_head.norm, and takes the main model's embed_tokens and lm_head instead of the
    # layer's own copies
    (_rx(_L + r"eh_proj"), lambda m: Role("linear", m[0], "replicated", int(m["layer"]), slot="eh_proj")),
    (_rx(_L + r"(?:enorm|hnorm|shared_head\.norm)"), lambda m: Role("norm", m[0], layer=int(m["layer"]))),
    (_rx(_L + r"(?:embed_tokens|shared_head\.head)"), lambda m: Role("embedding", m[0], "vocab", int(m["layer"]))),
    (_rx(_L + r"input_layernorm"), lambda m: Role("norm", m[0], layer=int(m["layer"]), stage="attn_in")),
    (_rx(_L + r"post_attention_layernorm"), lambda m: Role("norm", m[0], layer=int(m["layer"]), stage="mlp_in")),
    (_rx(r".*(?:norm|layernorm)"), lambda m: Role("norm", m[0])),
    (_rx(r"(?:model\.|language_model\.model\.)?embed_tokens"), lambda m: Role("embedding", m[0], "vocab")),
    (_rx(r"(?:language_model\.)?lm_head"), lambda m: Role("linear", m[0], "vocab", slot="lm_head")),
]


# Projections some checkpoints store fused in one tensor (Phi-3/Phi-4: qkv_proj, gate_up_proj; Falcon, GPT-NeoX:
# query_key_value; Baichuan: W_pack; InternLM2: wqkv; MPT, DBRX: Wqkv; GPT-2: c_attn), which no rule above takes:
# SGLang splits such a tensor by its own sizes, and a quantized one by its format's packing, which mpconvert's TP and
# fold rules do not model
_FUSED_IN_CHECKPOINT = re.compile(r".*\.(?:(?P<gate_up>gate_up_proj)|qkv_proj|query_key_value|W_pack|wqkv|Wqkv|c_attn)")


def unknown_module(name: str, where: str) -> str:
    """Why `where` (the base, a source) is refused for a module no rule gives a role, with what mpconvert takes."""
    m = _FUSED_IN_CHECKPOINT.fullmatch(name)
    if m:
        parts = "gate and up" if m["gate_up"] else "q, k and v"
        return (f"{where}: module {name!r} holds {parts} fused in one tensor (as Phi-3 and Phi-4 checkpoints store "
                f"them), which mpconvert does not take: it reads q_proj/k_proj/v_proj and gate_proj/up_proj as "
                f"separate tensors, as the Llama family stores them")
    return (f"{where}: module {name!r} has no known role: mpconvert knows the module names of the architectures "
            f"its README lists (the Llama family and its MoE, MLA and block-layout kin) and will not guess how to "
            f"treat it")


# Modules only an MTP layer has (a layer at or after num_hidden_layers): the model proper never loads them.
MTP_ONLY = ("eh_proj", "enorm", "hnorm", "shared_head.norm", "shared_head.head", "embed_tokens")
# What SGLang's NextN draft loads from an MTP layer besides its decoder layer (embed_tokens and shared_head.head it
# takes from the main model)
NEXTN_LOADS = ("eh_proj", "enorm", "hnorm", "shared_head.norm")
# Linears SGLang builds without a quant method whatever the checkpoint's format (the NextN draft's eh_proj): served
# only unquantized.
UNQUANTIZED_ONLY_SLOTS = ("eh_proj",)


# SGLang's NextN draft model (DeepseekV3ForCausalLMNextN) names the MTP layer `model.decoder` and its own modules
# `model.eh_proj`, `model.enorm`, …; its loader reads both from the checkpoint's model.layers.{num_hidden_layers}
# (layer 0 when num_hidden_layers is 1: deepseek_weight_loader._initialize_nextn_conf).
_NEXTN_DRAFT = re.compile(r"^model\.(?:decoder\.|(?=(?:eh_proj|enorm|hnorm|shared_head\.norm)$))")


def mtp_layer(num_hidden_layers: int) -> int:
    """The checkpoint layer SGLang's NextN draft model loads as its MTP layer."""
    return 0 if num_hidden_layers == 1 else num_hidden_layers


def from_nextn_draft(prefix: str, num_hidden_layers: int) -> str:
    """A layer prefix of SGLang's NextN draft model as the checkpoint (and the manifest) names it; any other prefix
    as it is."""
    return _NEXTN_DRAFT.sub(f"model.layers.{mtp_layer(num_hidden_layers)}.", prefix, count=1)


# Tensors a module may carry besides its format's: a linear's bias, and DeepSeek-V3's router bias (noaux_tc routing
# adds e_score_correction_bias to the router's scores). Bytes copied as they are.
EXTRA_TENSORS = ("bias", "e_score_correction_bias")


@lru_cache(maxsize=1 << 18)
def role_of(module: str) -> Role | None:
    """A module's role from its name (cached: plan, verify and the shim each ask for every module, more than once
    at DeepSeek-V3 scale, and a Role is immutable)."""
    for rx, build in _RULES:
        m = rx.fullmatch(module)
        if m:
            return build(m)
    return None


# ---- which norm a linear reads ------------------------------------------------------------------------------------
# A folded-scale producer (AWQ, SmoothQuant) divides the norm a linear reads by a per-channel scale and multiplies the
# linear's input columns by it, so that norm and its readers must come from one source. Which norm that is depends on
# the decoder block's layout, which the names of a layer's norms tell (as the producers' own mappings do:
# llm-compressor's AWQ and SmoothQuant mappings per architecture, AutoAWQ's; gptqmodel 7.6 folds a Gemma 2's gate/up
# into post_attention_layernorm, an output norm no linear reads, which build then refuses to couple):
#   pre-norm (Llama, Qwen, Mistral, Mixtral, DeepSeek): input_layernorm → attention, post_attention_layernorm → MLP;
#   sandwich (Gemma 2/3): post_attention_layernorm and post_feedforward_layernorm normalize the blocks' *outputs*;
#     the MLP reads pre_feedforward_layernorm;
#   post-norm (OLMo 2, EXAONE 4): post_attention_layernorm and post_feedforward_layernorm only — no norm before a
#     block, so nothing folds into one (v→o and up→down folds remain);
#   parallel (Cohere / Command R, StableLM with use_parallel_residual): no post_attention_layernorm; input_layernorm
#     feeds attention and the MLP at once, so q/k/v and gate/up share one fold.
_BLOCK_NORM = re.compile(_L + r"(?P<norm>input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
                              r"post_feedforward_layernorm)")


# Models whose RMSNorms scale by (1 + weight), not by weight (transformers' GemmaRMSNorm and its kin): a fold divides
# (1 + weight) by its scale, and verify --numeric compares a linear through 1 + weight.
OFFSET_NORM_MODELS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "vaultgemma", "recurrent_gemma",
                                "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"})


def norm_offset(model_type: str) -> float:
    """What a norm of this model adds to its weight before it scales: 1 for the OFFSET_NORM_MODELS, else 0."""
    return 1.0 if model_type in OFFSET_NORM_MODELS else 0.0


def stage_norms(modules: Iterable[str]) -> dict[tuple[int, str], str]:
    """(layer, stage) → the norm module that linears of that stage (attn_in: q/k/v, q_a/kv_a; mlp_in: gate/up,
    experts, shared experts, routers) read, for the layers of a model whose module names are `modules`. A stage with
    no norm before it has no entry."""
    layers: dict[int, dict[str, str]] = {}
    for name in modules:
        if name.endswith("layernorm") and (m := _BLOCK_NORM.fullmatch(name)):
            layers.setdefault(int(m["layer"]), {})[m["norm"]] = name
    out = {}
    for layer, norms in layers.items():
        if "input_layernorm" in norms:
            out[(layer, "attn_in")] = norms["input_layernorm"]
        if "pre_feedforward_layernorm" in norms:  # sandwich
            out[(layer, "mlp_in")] = norms["pre_feedforward_layernorm"]
        elif "post_feedforward_layernorm" in norms:  # post-norm: post_attention_layernorm is attention's output norm
            pass
        elif "post_attention_layernorm" in norms:  # pre-norm
            out[(layer, "mlp_in")] = norms["post_attention_layernorm"]
        elif "input_layernorm" in norms:  # parallel
            out[(layer, "mlp_in")] = norms["input_layernorm"]
    return out


def natural_key(name: str) -> tuple:
    """Sort key that orders layers and experts numerically (layers.2 before layers.10): the digit runs (every other
    part of the split) as integers."""
    parts = _DIGIT_RUNS.split(name)
    parts[1::2] = map(int, parts[1::2])
    return tuple(parts)


_DIGIT_RUNS = re.compile(r"(\d+)")


# Architecture facts that must agree between the base and every source (config.json keys).
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
              "n_routed_experts", "n_shared_experts", "vocab_size", "q_lora_rank", "kv_lora_rank",
              "tie_word_embeddings", "first_k_dense_replace", "decoder_sparse_step", "mlp_only_layers", "architectures",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "shared_expert_intermediate_size")
# Keys a source may omit (older producers leave them out); when both have one, they must agree.
OPTIONAL_KEYS = ("head_dim", "architectures")
# What an absent key means: transformers saves a config without the keys equal to PretrainedConfig's own defaults
# (AutoAWQ's transformers 4.51 leaves out a Gemma's tie_word_embeddings: true).
IMPLIED_KEYS = {"tie_word_embeddings": True}


def decoder_config(cfg: dict):
    """The decoder's part of a config.json: itself, or a multimodal model's text_config."""
    return cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int

    def mtp_layer_of(self, module: str) -> int | None:
        """The multi-token-prediction layer (one after the model's own layers) a module is in, or None. From the name:
        a layer's inner norms (MLA's, Qwen3's q/k norms) have no layer in their role."""
        m = _LAYER_NUMBER.match(module)
        return int(m[1]) if m and int(m[1]) >= self.num_layers else None

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "ModelInfo":
        archs = cfg.get("architectures")  # SGLang picks the model class from it: the output's config carries it
        if not (isinstance(archs, list) and archs and all(isinstance(a, str) and a for a in archs)):
            raise UserError(f"{where}: config.json architectures={archs!r} must be a list of model class names such "
                            f"as ['LlamaForCausalLM'] (SGLang picks the model class from it); fix the config")
        cfg = decoder_config(cfg)
        if not isinstance(cfg, dict):
            raise UserError(f"{where}: config.json text_config must be an object")

        def count(key: str, *alternatives: str, minimum: int = 1, default=None) -> int:
            for k in (key, *alternatives):
                v = cfg.get(k)
                if v is not None:
                    break
            else:
                if default is None:
                    raise UserError(f"{where}: config.json lacks {key!r}; mpconvert needs a decoder LLM config")
                return default
            check_integer(k, v, minimum, where)
            return v

        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise UserError(f"{where}: config.json model_type={model_type!r} must be a non-empty string")
        heads = count("num_attention_heads")
        check_size_keys(cfg, where)
        return cls(model_type, count("num_hidden_layers"), heads, count("num_key_value_heads", default=heads),
                   count(*EXPERT_COUNT_KEYS, minimum=0, default=0))


# The integer sizes of SHAPE_KEYS (beyond the counts from_config reads itself) with their least value: a base whose
# config holds one as a string or a float would otherwise be compared with every source as it is and the mismatch
# blamed on the source.
SIZE_KEYS = {"hidden_size": 1, "head_dim": 1, "intermediate_size": 1, "moe_intermediate_size": 1, "vocab_size": 1,
             "q_lora_rank": 1, "kv_lora_rank": 1, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 1,
             "shared_expert_intermediate_size": 0, "n_shared_experts": 0, "first_k_dense_replace": 0,
             "decoder_sparse_step": 1}


def check_integer(key: str, value, minimum: int, where: str) -> None:
    """A config.json count or size: an integer (not a bool, a float or a string) of at least `minimum`."""
    if type(value) is not int or value < minimum:
        raise UserError(f"{where}: config.json {key}={value!r} must be an integer ≥ {minimum}; fix the config")


def check_size_keys(cfg: dict, where: str) -> None:
    """Every architecture size config.json states (null: not stated) is an integer, tie_word_embeddings a boolean,
    mlp_only_layers a list of layer numbers."""
    for k, minimum in SIZE_KEYS.items():
        if cfg.get(k) is not None:
            check_integer(k, cfg[k], minimum, where)
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and type(tie) is not bool:
        raise UserError(f"{where}: config.json tie_word_embeddings={tie!r} must be true or false; fix the config")
    dense = cfg.get("mlp_only_layers")
    if dense is not None and not (isinstance(dense, list) and all(type(i) is int and i >= 0 for i in dense)):
        raise UserError(f"{where}: config.json mlp_only_layers={dense!r} must be a list of layer numbers; "
                        f"fix the config")


def with_mtp_layers(cfg: dict, count: int) -> dict:
    """A config.json for an output that holds `count` multi-token-prediction layers: num_nextn_predict_layers says so
    (SGLang's NextN draft loads the layers it announces; over none it would run on uninitialized weights, where 0
    makes it refuse). Unchanged where it already agrees."""
    c = decoder_config(cfg)
    if not isinstance(c, dict) or c.get("num_nextn_predict_layers", 0) == count:
        return cfg
    if c is cfg:
        return {**cfg, "num_nextn_predict_layers": count}
    return {**cfg, "text_config": {**c, "num_nextn_predict_layers": count}}


def check_same_architecture(base_cfg: dict, other_cfg: dict, where: str,
                            fix: str = "every source must be a quantization of the same base model") -> None:
    """A source must be the same model as the base: every architecture key equal (missing on both is fine)."""
    for k in SHAPE_KEYS:
        a, b = base_cfg.get(k, IMPLIED_KEYS.get(k)), other_cfg.get(k, IMPLIED_KEYS.get(k))
        if a != b and not (k in OPTIONAL_KEYS and (a is None or b is None)):
            raise UserError(f"{where}: config.json {k}={b!r} but the base has {k}={a!r}; {fix}")


def _expected_shape(role: Role, module: str, c: dict) -> tuple[int, ...] | None:
    """The weight shape config.json `c` implies for a module of this role ([out, in] for a linear), or None where
    the config does not say (a key missing) or the module is not one the table knows."""
    def get(*keys):
        for k in keys:
            if type(c.get(k)) is int:
                return c[k]
        return None

    hidden, heads, kv = get("hidden_size"), get("num_attention_heads"), get("num_key_value_heads")
    kv = kv or heads
    head = get("head_dim") or (hidden // heads if hidden and heads else None)
    nope, rope, v, q_rank, kv_rank = (get("qk_nope_head_dim"), get("qk_rope_head_dim"), get("v_head_dim"),
                                      get("q_lora_rank"), get("kv_lora_rank"))
    mla = None not in (nope, rope, v, kv_rank)
    if role.kind == "embedding" or role.slot == "lm_head":
        out, inp = get("vocab_size"), hidden
    elif role.kind == "norm":  # a layer's two norms, the final one, MTP's; not MLA's or Qwen3's inner q/k norms
        whole = (role.stage is not None or (role.layer is None and module.rsplit(".", 1)[-1] == "norm")
                 or module.endswith(MTP_ONLY))
        return (hidden,) if hidden and whole else None
    elif role.kind == "router":
        return (1, hidden) if module.endswith("shared_expert_gate") else (get(*EXPERT_COUNT_KEYS), hidden)
    elif role.slot in ("q", "k", "v", "o") and mla:
        width = {"q": heads * (nope + rope) if heads else None, "o": heads * v if heads else None}.get(role.slot)
        out, inp = (hidden, width) if role.slot == "o" else (width, hidden)
    elif role.slot in ("q", "k", "v", "o"):
        width = (heads if role.slot in ("q", "o") else kv) * head if head and heads else None
        out, inp = (hidden, width) if role.slot == "o" else (width, hidden)
    elif role.slot == "eh_proj":  # the MTP layer's projection of [enorm(embedding), hnorm(hidden)]
        out, inp = hidden, 2 * hidden if hidden else None
    elif role.slot == "q_a_proj":
        out, inp = q_rank, hidden
    elif role.slot == "kv_a_proj_with_mqa":
        out, inp = (kv_rank + rope if mla else None), hidden
    elif role.slot == "q_b_proj":
        out, inp = (heads * (nope + rope) if mla and heads else None), q_rank
    elif role.slot == "kv_b_proj":
        out, inp = (heads * (nope + v) if mla and heads else None), kv_rank
    elif role.slot in ("gate", "up", "down", "w1", "w3", "w2"):
        if role.expert is not None:
            width = get("moe_intermediate_size", "intermediate_size")
        elif ".shared_experts." in module:  # DeepSeek: n_shared_experts experts fused into one MLP
            n, w = get("n_shared_experts"), get("moe_intermediate_size")
            width = n * w if n and w else None
        elif ".shared_expert." in module:  # Qwen2-MoE
            width = get("shared_expert_intermediate_size")
        else:
            width = get("intermediate_size")
        out, inp = (hidden, width) if role.slot in ("down", "w2") else (width, hidden)
    else:
        return None
    return None if out is None or inp is None else (out, inp)


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def check_config_matches_weights(cfg: dict, weights: dict[str, tuple[int, ...]], where: str) -> None:
    problems = config_problems(cfg, weights)
    if problems:
        raise UserError(f"{where}: {problems[0]}{and_more(problems)}; config.json and the weights disagree (SGLang "
                        f"builds the model from config.json) — fix config.json or re-save the model")


def config_problems(cfg: dict, weights: dict[str, tuple[int, ...]], served: bool = False) -> list[str]:
    """Where a config.json disagrees with its own model's weights (module → weight shape). SGLang builds the model
    from the config: a width or head count the weights lack fails at load, and fewer layers than the weights have,
    or a MoE layer missing an expert, is served silently wrong. `served` (a built directory, not a base): the
    multi-token-prediction layers config.json announces must be there too (SGLang's NextN draft would run on
    uninitialized weights; a base may announce one that transformers left out, and build says how many it wrote)."""
    c = decoder_config(cfg)
    problems = []
    layers: dict[int, set[int]] = {}
    held: dict[int, set[str]] = {}  # layer → its modules but routed experts, the layer prefix cut
    expert_slots: dict[tuple[int, str], set[int]] = {}  # (layer, w1|w3|w2) → the experts holding it
    n_main = c.get("num_hidden_layers") if type(c.get("num_hidden_layers")) is int else 0
    expected: dict[tuple, tuple | None] = {}  # by what the shape depends on: 45k modules, a few dozen kinds
    for module, shape in weights.items():
        role = role_of(module)
        if role is None:
            continue
        mtp = module.endswith(MTP_ONLY)
        key = (role.kind, role.slot, role.stage, role.expert is None, role.layer is None, ".shared_experts." in module,
               ".shared_expert." in module, module.endswith("_gate"), module.endswith(".norm"), mtp)
        want = expected[key] if key in expected else expected.setdefault(key, _expected_shape(role, module, c))
        if want is not None and tuple(shape) != want:
            problems.append(f"{module}.weight has shape {list(shape)}, but config.json implies {list(want)}")
        if mtp and role.layer is not None and role.layer < n_main:
            problems.append(f"{module} is a multi-token-prediction module in layer {role.layer}, but config.json "
                            f"says the model's own layers are 0-{n_main - 1} (MTP layers follow them)")
        layer = role.layer
        if role.expert is not None:  # 41k of DeepSeek-V3's 45k modules: no string work
            layers.setdefault(layer, set()).add(role.expert)
            expert_slots.setdefault((layer, role.slot), set()).add(role.expert)
            continue
        if layer is None:  # a layer's inner norms (MLA's, Qwen3's q/k) know no layer; the model's own modules have none
            m = _LAYER_NUMBER.match(module)
            if m is None:
                continue
            layer = int(m[1])
        layers.setdefault(layer, set())
        held.setdefault(layer, set()).add(module.partition(f"layers.{layer}.")[2])
    n_layers, n_experts = c.get("num_hidden_layers"), next((c[k] for k in EXPERT_COUNT_KEYS if c.get(k)), 0)
    n_experts = n_experts if type(n_experts) is int else 0
    extra = c.get("num_nextn_predict_layers") or 0  # DeepSeek-V3's multi-token-prediction layers follow the rest
    if layers and type(n_layers) is int and not _ids_are(layers.keys(), n_layers, extra if type(extra) is int else 0):
        problems.append(f"config.json num_hidden_layers={n_layers}, but the weights hold layers "
                        f"{format_ids(sorted(layers))}")
    problems += _incomplete_layers(held, expert_slots, n_main)
    held = sum(1 for layer in layers if layer >= n_main) if n_main else 0
    if held and n_main == 1:
        problems.append("the weights hold a multi-token-prediction layer after a model of one layer, where SGLang's "
                        "NextN draft reads layer 0 as its MTP layer (deepseek_weight_loader)")
    if served and n_main and type(extra) is int and held != extra:
        problems.append(f"config.json num_nextn_predict_layers={extra}, but the weights hold {held} multi-token-"
                        f"prediction layer(s) after layer {n_main - 1} (SGLang's NextN draft loads what it announces)")
    for layer, experts in sorted(layers.items()):
        if experts and not _ids_are(experts, n_experts):
            problems.append(f"layer {layer} holds experts {format_ids(sorted(experts))}, but config.json says "
                            f"{n_experts} routed experts (ids 0-{n_experts - 1})")
    if cfg.get("tie_word_embeddings", c.get("tie_word_embeddings")) is False and _head_missing(weights):
        problems.append("config.json tie_word_embeddings=false, but the weights hold no lm_head (the model ties its "
                        "output head to the embeddings): SGLang would build a head of its own and leave it "
                        "uninitialized")
    return problems


def _head_missing(weights) -> bool:
    """The weights hold the model's embeddings and no output head of its own (MTP layers' embeddings aside)."""
    roles = [role_of(m) for m in weights if "embed_tokens" in m or "lm_head" in m]
    return any(r is not None and r.kind == "embedding" and r.layer is None for r in roles) and \
        not any(r is not None and r.slot == "lm_head" for r in roles)


def _incomplete_layers(held: dict[int, set[str]], expert_slots: dict[tuple[int, str], set[int]],
                       n_main: int) -> list[str]:
    """Modules some layer lacks that other layers hold — attention and norms every layer has, the MLP that every
    dense or every MoE layer has, what every multi-token-prediction layer has — and projections a routed expert lacks
    that the layer's other experts hold: a checkpoint with a shard or a tensor missing. SGLang's loader fills what it
    is given and leaves the rest uninitialized."""
    moe = {layer for layer, _ in expert_slots} | {
        layer for layer, mods in held.items() if any(m.endswith(("mlp.gate", "block_sparse_moe.gate")) for m in mods)}

    def kinds(layer: int) -> list[tuple[str, bool]]:  # ("" | "mlp" | "mtp", MoE layer?)
        return [("", False), ("mlp", layer in moe)] + ([("mtp", False)] if layer >= n_main else [])

    def kind(layer: int, module: str) -> tuple[str, bool]:
        if module.startswith(("mlp.", "block_sparse_moe.")):
            return "mlp", layer in moe
        return ("mtp" if module.endswith(MTP_ONLY) else ""), False

    expected: dict[tuple[str, bool], set[str]] = {("mtp", False): set(NEXTN_LOADS)}
    for layer, mods in held.items():
        for m in mods:
            expected.setdefault(kind(layer, m), set()).add(m)
    problems = []
    for layer, mods in sorted(held.items()):
        missing = sorted((m for k in kinds(layer) for m in expected.get(k, ()) if m not in mods), key=natural_key)
        if missing:
            problems.append(f"layer {layer} lacks {missing[0]}{and_more(missing)}, which layers of its kind hold (a "
                            f"shard or tensor missing?)")
    experts: dict[int, set[int]] = {}
    for (layer, _), ids in expert_slots.items():
        experts.setdefault(layer, set()).update(ids)
    for (layer, slot), ids in sorted(expert_slots.items()):
        if ids != experts[layer]:
            e = min(experts[layer] - ids)
            problems.append(f"expert {e} of layer {layer} lacks its {_SLOT_NAME.get(slot, slot)}, which the layer's "
                            f"other experts hold (a shard or tensor missing?)")
    return problems


_SLOT_NAME = {"w1": "gate_proj (w1)", "w3": "up_proj (w3)", "w2": "down_proj (w2)"}


def _ids_are(ids, n: int, optional: int = 0) -> bool:
    """Whether the non-negative ids are exactly 0 … n-1, plus any of the `optional` ids after them — counted, never
    spelled out as a set: a config.json may say 10^9 layers (which once took all of memory)."""
    return sum(1 for i in ids if i < n) == n and all(i < n + optional for i in ids)


# Quantizers under transformers 5 write Mixtral experts as `…experts.N.{gate,up,down}_proj` (under
# `block_sparse_moe` or `mlp`); SGLang's Mixtral loader wants `block_sparse_moe.experts.N.w1/w3/w2` and
# `block_sparse_moe.gate`. Names are mapped here, once; bytes are untouched.
_MIXTRAL_EXPERT = re.compile(r"^(.*layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_MIXTRAL_ROUTER = re.compile(r"^(.*layers\.\d+\.)mlp\.gate$")


def module_renamer(model_type: str):
    """canonical_module for this model type as a function of the module name, or None where it keeps every name."""
    return (lambda module: canonical_module(module, model_type)) if model_type == "mixtral" else None


def canonical_module(module: str, model_type: str) -> str:
    if model_type == "mixtral":
        m = _MIXTRAL_EXPERT.match(module)
        if m:
            return f"{m[1]}block_sparse_moe.experts.{m[2]}.{ {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}[m[3]] }"
        m = _MIXTRAL_ROUTER.match(module)
        if m:
            return f"{m[1]}block_sparse_moe.gate"
    return module
