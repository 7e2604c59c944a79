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

from .errors import UserError

_L = r"(?P<pfx>(?:model\.|language_model\.model\.)?layers\.(?P<layer>\d+)\.)"
_MOE = r"(?P<moe>mlp|block_sparse_moe)"


@dataclass(frozen=True)
class Role:
    """What one module is. `unit` is SGLang's layer prefix that holds it; `parallel` how TP splits it."""

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


# (regex, builder) — first match wins. Builders take the match and return a Role. Routed experts come first: they
# are most of a MoE model's modules (41k of 45k in DeepSeek-V3), and no other rule matches their names.
_RULES: list[tuple[re.Pattern, object]] = [
    (_rx(_L + _MOE + r"\.experts\.(?P<e>\d+)\.(?P<p>gate_proj|up_proj|down_proj|w1|w2|w3)"), lambda m: Role(
        "linear", m["pfx"] + m["moe"] + ".experts", "row" if m["p"] in ("down_proj", "w2") else "column",
        int(m["layer"]), None if m["p"] in ("down_proj", "w2") else "mlp_in",
        (m["pfx"] + f"experts.{m['e']}.updown", "consumer" if m["p"] in ("down_proj", "w2") else "producer")
        if m["p"] in ("down_proj", "w2", "up_proj", "w3") else None,
        expert=int(m["e"]), slot={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}.get(m["p"], m["p"]))),
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
    (_rx(_L + r"input_layernorm"), lambda m: Role("norm", m[0], layer=int(m["layer"]), stage="attn_in")),
    (_rx(_L + r"post_attention_layernorm"), lambda m: Role("norm", m[0], layer=int(m["layer"]), stage="mlp_in")),
    (_rx(r".*(?:norm|layernorm)"), lambda m: Role("norm", m[0])),
    (_rx(r"(?:model\.|language_model\.model\.)?embed_tokens"), lambda m: Role("embedding", m[0], "vocab")),
    (_rx(r"(?:language_model\.)?lm_head"), lambda m: Role("linear", m[0], "vocab", slot="lm_head")),
]


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


def natural_key(name: str) -> tuple:
    """Sort key that orders layers and experts numerically (layers.2 before layers.10)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


# Architecture facts that must agree between the base and every source (config.json keys).
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
              "n_routed_experts", "n_shared_experts", "vocab_size", "q_lora_rank", "kv_lora_rank",
              "tie_word_embeddings", "first_k_dense_replace", "decoder_sparse_step", "mlp_only_layers", "architectures")
# Keys a source may omit (older producers leave them out); when both have one, they must agree.
OPTIONAL_KEYS = ("head_dim", "architectures")


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
            if type(v) is not int or v < minimum:
                raise UserError(f"{where}: config.json {k}={v!r} must be an integer ≥ {minimum}; fix the config")
            return v

        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise UserError(f"{where}: config.json model_type={model_type!r} must be a non-empty string")
        heads = count("num_attention_heads")
        return cls(model_type, count("num_hidden_layers"), heads, count("num_key_value_heads", default=heads),
                   count("num_experts", "num_local_experts", "n_routed_experts", minimum=0, default=0))


def check_same_architecture(base_cfg: dict, other_cfg: dict, where: str,
                            fix: str = "every source must be a quantization of the same base model") -> None:
    """A source must be the same model as the base: every architecture key equal (missing on both is fine)."""
    for k in SHAPE_KEYS:
        a, b = base_cfg.get(k), other_cfg.get(k)
        if a != b and not (k in OPTIONAL_KEYS and (a is None or b is None)):
            raise UserError(f"{where}: config.json {k}={b!r} but the base has {k}={a!r}; {fix}")


# Quantizers under transformers 5 write Mixtral experts as `…experts.N.{gate,up,down}_proj` (under
# `block_sparse_moe` or `mlp`); SGLang's Mixtral loader wants `block_sparse_moe.experts.N.w1/w3/w2` and
# `block_sparse_moe.gate`. Names are mapped here, once; bytes are untouched.
_MIXTRAL_EXPERT = re.compile(r"^(.*layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_MIXTRAL_ROUTER = re.compile(r"^(.*layers\.\d+\.)mlp\.gate$")


def canonical_module(module: str, model_type: str) -> str:
    if model_type == "mixtral":
        m = _MIXTRAL_EXPERT.match(module)
        if m:
            return f"{m[1]}block_sparse_moe.experts.{m[2]}.{ {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}[m[3]] }"
        m = _MIXTRAL_ROUTER.match(module)
        if m:
            return f"{m[1]}block_sparse_moe.gate"
    return module
