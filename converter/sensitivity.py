"""`mpconvert plan`, the measuring half: what swapping one unit from the base to one source costs, as the KL of the
next-token distribution against the base on calibration text.

The base runs once in transformers (float32), recording every decoder layer's input. A swap of a unit in layer l
replaces only that unit's weights by its source's, dequantized with the format's reference dequantizer (the bytes
build copies), with its inputs quantized as the format's SGLang kernel does (W8A8: per-token Int8 or FP8 —
Format.quantize_activations), and runs layers l..L-1, the final norm and the head from the recorded input: the
exact KL of that swap, at the cost of the model's tail. A folded-scale source's swap takes its group's units and the norms it changed
together. GPU when torch sees one, else the CPU; memory: the float32 model, the recorded inputs, two logit sets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import UserError
from .formats import FORMATS
from .formats.base import Format
from .layout import role_of, stage_norms
from .numeric import dequantize, kl_mean, load_tokenizer, read_text, token_kl
from .plan import Inputs
from .safetensors_io import load_tensor

SEQ_LEN = 256
MIN_TOKENS = 64


def calibration_ids(tokenizer_dirs: list[Path], files: list[Path], tokens: int):
    """The first `tokens` tokens of the calibration files (concatenated), as [n, SEQ_LEN] windows."""
    words = [read_text("--calib", f) for f in files]
    tok = load_tokenizer("--calib", tokenizer_dirs)
    ids = tok("\n\n".join(words), return_tensors="pt", add_special_tokens=False).input_ids[0][:tokens]
    if ids.numel() < MIN_TOKENS:
        raise UserError(f"--calib: {ids.numel()} tokens of text; plan needs at least {MIN_TOKENS} (a few paragraphs; "
                        f"{tokens} by default) — give more text")
    seq = min(SEQ_LEN, ids.numel())
    n = ids.numel() // seq
    return ids[: n * seq].reshape(n, seq)


class Tail:
    """The base model and each decoder layer's recorded input, able to rerun the model from any layer."""

    def __init__(self, base: Path, ids, device: str):
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # plan draws its own
        self.device = device
        self.model = base_model(base, device)
        self.ids = ids.to(device)
        self.layers = self.model.model.layers
        self.inputs: dict[int, tuple] = {}
        self.routed: dict[int, list[int]] = {}  # MoE layer → tokens its router sent to each expert (top-k slots)
        hooks = [layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
                 for i, layer in enumerate(self.layers)]
        for i, layer in enumerate(self.layers):  # each MoE layer's routed experts (mlp, or Mixtral's older name)
            experts = getattr(getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None), "experts", None)
            if getattr(experts, "num_experts", None):  # (a module transformers calls with each token's experts)
                hooks.append(experts.register_forward_pre_hook(self._routing_counter(i, experts), with_kwargs=True))
        try:
            with torch.inference_mode():
                logits = self.model(input_ids=self.ids, use_cache=False).logits
        finally:
            for h in hooks:
                h.remove()
        # float32 is enough: a token's KL sums p·Δlog p over the vocabulary with p summing to 1, so rounding
        # (~1e-7 relative) stays orders below the smallest swap cost that matters (~1e-5 nats)
        self.base_logp = torch.log_softmax(logits.float(), -1)
        self.base_p = self.base_logp.exp()

    def _recorder(self, i: int):
        def pre(mod, args, kwargs):
            kw = dict(kwargs)
            h = kw.pop("hidden_states") if "hidden_states" in kw else args[0]
            rest = args[1:] if "hidden_states" not in kwargs else args
            self.inputs[i] = (h.detach(), rest, kw)
        return pre

    def _routing_counter(self, layer: int, experts):
        """Counts the experts each token is sent to, as the layer's experts module receives them (transformers' MoE
        blocks call it with (hidden_states, top_k_index, top_k_weights)): the routing as the model does it — with
        DeepSeek-V3's and GLM-4.5's group-limited choice and score correction bias, which a top-k of the router's
        logits is not (and 256 experts of which a few tokens reach some only: the count covers every expert)."""
        def count(mod, args, kwargs):
            import torch

            ids = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
            counts = torch.bincount(ids.flatten().long(), minlength=experts.num_experts).tolist()
            prev = self.routed.get(layer)
            self.routed[layer] = counts if prev is None else [a + b for a, b in zip(prev, counts)]
        return count

    def kl_from(self, layer: int | None) -> float:
        """Mean KL(base ‖ current weights) per token, running from `layer`'s recorded input (None: the whole
        model)."""
        import torch

        with torch.inference_mode():
            if layer is None:
                logits = self.model(input_ids=self.ids, use_cache=False).logits
            else:
                h = self.inputs[layer][0]
                for j in range(layer, len(self.layers)):
                    _, rest, kw = self.inputs[j]
                    out = self.layers[j](h, *rest, **kw)
                    h = out[0] if isinstance(out, tuple) else out
                logits = self.model.lm_head(self.model.model.norm(h))
            logp = torch.log_softmax(logits, -1)
            return kl_mean(float(token_kl(self.base_logp, logp, self.base_p).double().mean()))


def input_quantizer(fmt_name: str, params: dict, tensors: dict, device: str = "cpu"):
    """x → x as its format's SGLang kernel quantizes a layer's input (Format.quantize_activations; tensors: suffix →
    TensorInfo, for a static input scale), or None for a weight-only format."""
    fmt = FORMATS[fmt_name]
    if type(fmt).quantize_activations is Format.quantize_activations:
        return None
    loaded = {s: load_tensor(t).to(device) for s, t in tensors.items() if s == "input_scale"}
    return lambda x: fmt.quantize_activations(x, params, loaded)


def quantize_inputs(model, name: str, fmt_name: str, params: dict, tensors: dict, device: str = "cpu"):
    """Make module `name` of a transformers model quantize its input as its format's SGLang kernel does. Returns the
    hook handle, or None for a weight-only format or a fused expert (not a module of its own: FusedExperts)."""
    quantize = input_quantizer(fmt_name, params, tensors, device)
    if quantize is None:
        return None
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    return mod.register_forward_pre_hook(lambda module, args: (quantize(args[0]),) + tuple(args[1:]))


class FusedExperts:
    """A transformers fused-experts module (gate_up_proj [E, 2I, H] gate rows first, down_proj [E, H, I]) whose
    expert loop quantizes each expert's inputs as that expert's SGLang MoE kernel does — its w13 input (the routed
    hidden states) and its w2 input (act(gate)·up), per expert — for the experts given a quantizer; the others and
    everything else as transformers' own eager loop. Installed on the instance, removed by unpatch()."""

    def __init__(self, experts):
        layout = (getattr(experts, "has_gate", True), getattr(experts, "is_concatenated", True),
                  getattr(experts, "is_transposed", False), getattr(experts, "has_bias", False))
        if layout != (True, True, False, False):
            raise UserError(f"plan: {type(experts).__name__} stores its experts in a layout plan does not emulate "
                            f"(gate {layout[0]}, concatenated {layout[1]}, transposed {layout[2]}, bias {layout[3]})")
        self.experts, self.quantizers = experts, {}
        experts.forward = self.forward  # an instance attribute: nn.Module calls it instead of the class's

    def unpatch(self) -> None:
        del self.experts.forward

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """transformers' eager expert loop (the same order of experts, tokens and sums), plus the quantizers."""
        import torch

        ex, out, same = self.experts, torch.zeros_like(hidden_states), (lambda v: v)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=ex.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            pos, token = torch.where(mask[e])
            x = self.quantizers.get((e, "w13"), same)(hidden_states[token])
            gate, up = torch.nn.functional.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
            h = self.quantizers.get((e, "w2"), same)(ex.act_fn(gate) * up)
            y = torch.nn.functional.linear(h, ex.down_proj[e]) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class Swaps:
    """Weights replaced in the loaded base, undone by restore(). A linear of its own is replaced whole; an expert of a
    MoE layer that transformers fuses (`experts.gate_up_proj` [E, 2I, H] with gate rows first, `experts.down_proj`
    [E, H, I]) is written into its slice."""

    def __init__(self, model, device: str):
        self.model, self.device, self.saved, self.hooks = model, device, [], []
        self._fused: dict[int, FusedExperts] = {}  # id(experts module) → its patched expert loop

    def linear(self, name: str, view, out_f: int, in_f: int) -> None:
        """Serve linear `name` from a source's module view: its weight dequantized from the bytes build copies, its
        bias, and its input quantized as that format's SGLang kernel quantizes it (W8A8: per-token Int8 or FP8) —
        for an expert of a fused MoE layer, inside the layer's expert loop (FusedExperts)."""
        self.put(name, "weight", dequantize(view.scheme, view.tensors, out_f, in_f))
        if "bias" in view.tensors:
            self.put(name, "bias", load_tensor(view.tensors["bias"]))
        hook = quantize_inputs(self.model, name, view.scheme.format, view.scheme.params, view.tensors, self.device)
        if hook is not None:
            self.hooks.append(hook)
        elif (role := role_of(name)) is not None and role.expert is not None:
            quantize = input_quantizer(view.scheme.format, view.scheme.params, view.tensors, self.device)
            if quantize is not None:
                experts = self._experts_of(name)
                if id(experts) not in self._fused:
                    self._fused[id(experts)] = FusedExperts(experts)
                self._fused[id(experts)].quantizers[(role.expert, "w2" if role.slot == "w2" else "w13")] = quantize

    def put(self, module: str, what: str, value) -> None:
        import torch

        value = value.to(device=self.device, dtype=torch.float32)
        p = self._plain(module, what)
        if p is not None:
            self.saved.append((p, None, p.data))
            p.data = value.reshape(p.data.shape)
            return
        p, idx = self._expert_slice(module, what)
        self.saved.append((p, idx, p.data[idx].clone()))
        p.data[idx] = value.reshape(p.data[idx].shape)

    def restore(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for f in self._fused.values():
            f.unpatch()
        self._fused.clear()
        for p, idx, old in reversed(self.saved):
            if idx is None:
                p.data = old
            else:
                p.data[idx] = old
        self.saved.clear()

    def _plain(self, module: str, what: str):
        try:
            return getattr(self.model.get_submodule(module), what, None)
        except AttributeError:
            return None

    def _experts_of(self, module: str):
        """The fused experts module (transformers) holding expert linear `module`."""
        role = role_of(module)
        owner = module.rsplit(f".experts.{role.expert}.", 1)[0]
        for prefix in (owner, owner.replace("block_sparse_moe", "mlp")):
            try:
                return self.model.get_submodule(prefix + ".experts")
            except AttributeError:
                continue
        raise UserError(f"plan: cannot find the fused experts of {owner} in the base model as transformers builds it")

    def _expert_slice(self, module: str, what: str):
        role = role_of(module)
        if role is None or role.expert is None or what != "weight":
            raise UserError(f"plan: the base model as transformers builds it has no {module}.{what}; plan measures "
                            f"linears that are modules of their own or experts of a fused MoE layer")
        experts = self._experts_of(module)
        e = role.expert
        if role.slot == "w2":
            return experts.down_proj, (e,)
        half = experts.gate_up_proj.shape[1] // 2
        rows = slice(0, half) if role.slot == "w1" else slice(half, 2 * half)
        return experts.gate_up_proj, (e, rows)


def measure(inputs: Inputs, wanted: list[tuple[str, ...]], units: dict, base: Path, ids, device: str,
            on_step: Callable[[], None] = lambda: None) -> tuple[dict[tuple[str, ...], float], dict[int, list[int]]]:
    """KL of each swap, `(source, unit, unit…)` → KL (choose.measurements_needed lists them), and the base's routing
    on the calibration text (MoE layer → tokens per expert)."""
    import torch

    tail = Tail(base, ids, device)
    swaps = Swaps(tail.model, device)
    out, norm_of = {}, stage_norms(inputs.base.modules)
    for key in sorted(wanted, key=lambda k: (_layer(units, k[1]) or -1, k)):
        label, group = key[0], key[1:]
        src = inputs.sources[label]
        try:
            for unit in group:
                server = next(s for s in units[unit] if s.source == label)
                for name in server.modules:
                    swaps.linear(name, src.modules[name], *inputs.base.modules[name].tensors["weight"].shape)
                if server.folds:
                    for norm in _consumed_norms(norm_of, server.modules):
                        swaps.put(norm, "weight", load_tensor(src.modules[norm].tensors["weight"]))
            out[key] = tail.kl_from(_layer(units, group[0]))
        finally:
            swaps.restore()
        on_step()
    routed = tail.routed
    del tail, swaps
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out, routed


def _layer(units: dict, unit: str) -> int | None:
    return role_of(units[unit][0].modules[0]).layer


def _consumed_norms(norm_of: dict, modules: tuple[str, ...]) -> list[str]:
    """The norms a folded-scale source changed for these modules: those they read (norm_of: layout.stage_norms)."""
    return sorted({norm_of.get((role_of(m).layer, role_of(m).stage)) for m in modules} - {None})


def evaluate(recipe, texts: list[Path] | None, tokens: int, device: str, model=None, ids=None) -> dict:
    """Perplexity and KL to the base on held-out text of what `recipe` builds — planned by build's own planner, each
    linear dequantized from the bytes build would copy (and each norm from the source build takes it from): what
    `verify --numeric --text` measures on the built directory, without writing it. `model`: a loaded base to reuse
    (restored after); `ids`: token windows to use instead of `texts`."""
    import math

    import torch

    from .plan import make_plan

    plan = make_plan(recipe)
    base = recipe.path_of("base")
    model = base_model(base, device) if model is None else model
    ids = (calibration_ids(recipe.tokenizer_dirs(), texts, tokens) if ids is None else ids).to(device)
    swaps = Swaps(model, device)
    try:
        with torch.inference_mode():
            base_logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        for m in plan.modules:
            if m.source == "base":
                continue
            view = plan.sources[m.source].modules[m.name]
            if m.role.kind == "linear":
                swaps.linear(m.name, view, m.out_features, m.in_features)
            elif "weight" in view.tensors:
                swaps.put(m.name, "weight", load_tensor(view.tensors["weight"]))
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    finally:
        swaps.restore()
    target = ids[:, 1:, None]
    nll_b = -float(base_logp[:, :-1].gather(-1, target).double().mean())
    nll = -float(logp[:, :-1].gather(-1, target).double().mean())
    kl = kl_mean(float(token_kl(base_logp, logp).double().mean()))
    return {"kl": kl, "perplexity": math.exp(nll), "perplexity_base": math.exp(nll_b), "bytes": plan.total_bytes,
            "tokens": int(ids.numel())}


def base_model(base: Path, device: str):
    """The bf16 base as plan and evaluate run it: transformers, float32, eval mode, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval().to(device)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """--device as plan measures on it: cpu, or a CUDA device this machine has (default: cuda when present)."""
    import torch

    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: plan measures on cpu or cuda")
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use cpu "
                        f"or one it has")
    return device
