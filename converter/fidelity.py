"""Numeric fidelity: the converted model, dequantized on CPU with each format's reference dequantizer, against the
bf16 base — per decoder block on the base's own hidden states, and end to end (logits cosine, top-1 agreement).

The model runs in transformers (float32). Dequantized weights go into a temporary checkpoint with the base's names
and config, loaded by transformers itself, so MoE expert fusion and name conversion stay transformers' business.
"""
from __future__ import annotations

import copy
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import UserError
from .formats import FORMATS
from .layout import norm_offset, role_of, stage_norms
from .rules import fold_pairs
from .numeric import dequantize, kl_mean, load_tokenizer, read_text, rel_error, token_kl
from .safetensors_io import TensorInfo, load_tensor

# AWQ fold consistency: the per-input-channel scale s AWQ moved into a consumer (least squares of Ŵ against W,
# per column) implies the norm the consumer needs, base_norm / s; the norm in the directory must be that one. The
# estimate carries the producer's own weight changes besides rounding (AutoAWQ clips weights: 0.023–0.030 off
# when right, gptqmodel 0.007–0.011), and the wrong norm is off by how far AWQ moved the scales (random tiny models:
# 0.027–0.08). So a norm is refused only when it is off by more than FOLD_ERROR *and* explains the folded weights
# no better than the base model's own norm would (ratio ≥ FOLD_RATIO; right: ≤ 0.52 for both producers on the
# fixtures; the base norm: 1 by definition).
FOLD_ERROR, FOLD_RATIO = 0.02, 0.75


def module_band(fmt: str, params: dict, reference) -> tuple[float, float]:
    """The largest weight error a correctly decoded module of this scheme may have against `reference` (the base
    weight, norm-scaled for folded-scale formats), and the error of round-to-nearest in the same scheme on it.

    A fixed number per format fails correct modules of real, outlier-heavy layers (a real 135M model's GPTQ g64 layer
    measured 0.257 against a fixed 0.25) and lets bugs through on tame ones; what the scheme itself can do on this
    very weight is the yardstick: the band is Format.rtn_factor × that (never below Format.module_floor). A decoding
    bug lands well beyond it: a v2 zero read as v1 shifts every value by a whole step (≈3.5× RTN), a missed AWQ
    interleave scrambles columns (≈10×), a scale from another source is off by its ratio."""
    f = FORMATS[fmt]
    rtn = f.rtn_error(reference, params)
    return max(f.module_floor, f.rtn_factor * rtn), rtn


def _dequantized_state(directory: Path, manifest, found: dict[str, TensorInfo], base: Path) -> tuple[dict, dict]:
    """The dequantized model's state dict (float32, the base's names) and each linear's error {name: (error, band,
    rtn)}, AWQ fold errors under name + '#fold'."""
    import torch

    base_ck = Checkpoint.open(base, "base")
    state = {n: load_tensor(t).float() for n, t in base_ck.tensors.items()}
    base_state = dict(state)
    dequantized = {}
    for name, mod in manifest.modules.items():
        tensors = {s: found[t.name] for s, t in mod.tensors.items()}
        if mod.kind == "linear":
            key = f"{name}.weight"
            if key not in state or tuple(state[key].shape) != tuple(mod.shape):
                raise UserError(f"--base {base}: has no {key} of shape {mod.shape}; pass the base model this "
                                f"directory was built from")
            state[key] = dequantized[name] = dequantize(mod.scheme, tensors, *mod.shape).to(torch.float32)
            if "bias" in tensors:
                state[f"{name}.bias"] = load_tensor(tensors["bias"]).float()
        else:
            for s, t in tensors.items():
                state[f"{name}.{s}"] = load_tensor(t).float()
    errors = {}
    norm_of = stage_norms(manifest.modules)
    pairs = {key: {side: m.name for side, m in p.items()} for key, p in fold_pairs(manifest.linears()).items()}
    for name, w in dequantized.items():  # once every linear is dequantized: a pair's scale is read off its partner
        mod = manifest.modules[name]
        errors[name] = module_error(name, mod, w, base_state, norm_of, manifest, found, pairs, dequantized)
        fold = fold_error(name, mod, w, base_state, norm_of, manifest, found)
        if fold is not None:
            errors[name + "#fold"] = fold
    return state, errors


def _read_norm(name: str, role, norm_of: dict, manifest, found: dict):
    """(the norm module that linear `name` reads, its gain in the directory), or None where no norm is before it
    (norm_of: layout.stage_norms of the directory's modules)."""
    nname = norm_of.get((role.layer, role.stage))
    if nname is None:
        return None
    return nname, _gain(load_tensor(found[manifest.modules[nname].tensors["weight"].name]).float(), manifest)


def _gain(weight, manifest):
    """What a norm of this weight scales by: the weight, or 1 + weight where the model's norms are offset (Gemma's:
    AutoAWQ divides 1 + weight by its scale)."""
    return weight + norm_offset(manifest.model.model_type)


def fold_error(name: str, mod, w, base_state: dict, norm_of: dict, manifest, found: dict) -> float | None:
    role = role_of(name)
    # only consumers whose rows carry no second fold (v_proj and up_proj also carry o_proj's / down_proj's scales)
    if not FORMATS[mod.format].folds(mod.params) or role.slot not in ("q", "k", "gate", "w1"):
        return None
    norm = _read_norm(name, role, norm_of, manifest, found)
    if norm is None:
        return None
    nname, n_out = norm
    ref = base_state[f"{name}.weight"]
    s = (w * ref).sum(0) / (ref * ref).sum(0)
    n_base = _gain(base_state[f"{nname}.weight"], manifest)
    implied = n_base / s
    return rel_error(n_out, implied), rel_error(n_base, implied)


def module_error(name: str, mod, w, base_state: dict, norm_of: dict, manifest, found: dict, pairs: dict,
                 dequantized: dict) -> tuple[float, float, float] | None:
    """(‖Ŵ−W‖/‖W‖ against the base weight, its band, round-to-nearest's error), Ŵ and W as _compared gives them;
    None where not comparable (a folded-scale module before which no norm and no pair lies: its scales are nowhere
    to be read)."""
    compared = _compared(name, mod, w, base_state, norm_of, manifest, found)
    if compared is None:
        return None
    w, ref = compared
    role = role_of(name)
    if FORMATS[mod.format].folds(mod.params) and role.pair:
        s = pair_scale(role.pair[1], pairs[role.pair[0]], base_state, norm_of, manifest, found, dequantized)
        if s is not None:
            w = w * s[:, None] if role.pair[1] == "producer" else w / s[None, :]
    band, rtn = module_band(mod.format, mod.params, ref)
    return rel_error(w, ref), band, rtn


def _compared(name: str, mod, w, base_state: dict, norm_of: dict, manifest, found: dict):
    """(Ŵ, W) as a linear is compared with the base. One read through a folded scale is compared as norm·W, since
    the fold moved a scale from the norm into the weight: every module of a folded-scale format, and any module
    whose norm in the directory differs from the base's (SmoothQuant, which no format records: a W8A8 module
    quantized against its smoothed norm). None for a folded-scale module with neither a norm before it nor a pair."""
    import torch

    ref = base_state[f"{name}.weight"]
    role = role_of(name)
    norm = _read_norm(name, role, norm_of, manifest, found)
    folds = FORMATS[mod.format].folds(mod.params)
    if folds and norm is None and not role.pair:
        return None
    if norm is not None:
        nname, n_out = norm
        n_base = _gain(base_state[f"{nname}.weight"], manifest)
        if folds or not torch.equal(n_out, n_base):
            w, ref = w * n_out, ref * n_base
    return w, ref


def pair_scale(side: str, pair: dict[str, str], base_state: dict, norm_of: dict, manifest, found: dict,
               dequantized: dict):
    """The per-channel scale s that a folded-scale producer (AWQ) moved between a pair (v_proj→o_proj,
    up_proj→down_proj, an expert's w3→w2): the consumer's input columns multiplied by s, the producer's output rows
    divided by it. Stored nowhere, so estimated — for each side from the *other* one, so that a module's own fault
    is not fitted away (read off itself, a consumer with half its output channels' scales 1.5× passed): least squares
    per column of the consumer, per row of the producer (as compared, through its norm). Compared raw, a correct AWQ
    up_proj of the Qwen2 fixture (s from 0.45 to 2.17) failed its band, 0.435 against 0.308 (0.113 through s; round-
    to-nearest 0.103), and o_proj and down_proj were not compared at all. None where the pair has no such fold: a
    partner missing, or shapes that do not chain (GQA's v_proj→o_proj, which the producers skip)."""
    prod, cons = pair.get("producer"), pair.get("consumer")
    if prod is None or cons is None or dequantized[prod].shape[0] != dequantized[cons].shape[1]:
        return None
    if side == "producer":  # Ŵc ≈ Wc · diag(s)
        w, ref = dequantized[cons], base_state[f"{cons}.weight"]
        num, den = (w * ref).sum(0), (ref * ref).sum(0)
    else:  # Ŵp ≈ diag(1/s) · Wp
        compared = _compared(prod, manifest.modules[prod], dequantized[prod], base_state, norm_of, manifest, found)
        if compared is None:
            return None
        w, ref = compared
        num, den = (ref * ref).sum(1), (w * ref).sum(1)
    s = num / den.where(den.abs() > 1e-30, den.new_ones(()))
    return s.where((num.abs() > 1e-30) & (den.abs() > 1e-30), s.new_ones(()))  # a channel of zeros carries none


def _capture(model, ids, replace: dict | None = None):
    """Run `model`; record each decoder layer's input and output. With `replace`, each layer's input is swapped
    for the given one (teacher forcing: every block sees the base's hidden states)."""
    import torch

    layers = model.model.layers
    inputs, outputs, hooks = {}, {}, []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            if "hidden_states" in kwargs:
                h = kwargs["hidden_states"]
                if replace is not None:
                    kwargs = {**kwargs, "hidden_states": replace[i]}
            else:
                h = args[0]
                if replace is not None:
                    args = (replace[i],) + tuple(args[1:])
            inputs[i] = h.detach().clone()
            return args, kwargs

        def post(mod, args, kwargs, out, i=i):
            outputs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs, logits


def numeric_check(directory: Path, manifest, found: dict[str, TensorInfo], base: Path, rep, thresholds: dict,
                  text: Path | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # verify draws its own (transformers drew two more, under it, even with --json)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    vocab = base_model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 32), generator=g)
    b_in, b_out, b_logits = _capture(base_model, ids)
    model_class, config = type(base_model), copy.deepcopy(base_model.config)
    if text is None:
        del base_model  # one float32 model in memory at a time, unless --text runs the two side by side
    state, mod_errors = _dequantized_state(directory, manifest, found, base)
    # loaded from memory: written out first, it took 4 bytes per parameter of the temporary directory's disk
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32).eval()
    del state
    _, q_out, _ = _capture(model, ids, replace=b_in)
    _, _, q_logits = _capture(model, ids)
    result = {"module_error_max": _module_findings(manifest, mod_errors, thresholds, rep),
              **_block_findings(manifest, b_in, b_out, q_out, thresholds, rep)}
    linear_formats = {m.format for m in manifest.modules.values() if m.kind == "linear"}
    cos = float(torch.nn.functional.cosine_similarity(q_logits.flatten(0, 1), b_logits.flatten(0, 1), dim=-1).mean())
    top1 = float((q_logits.argmax(-1) == b_logits.argmax(-1)).float().mean())
    cos_limit = min(thresholds.get("cosine", {}).get(f, FORMATS[f].logits_cosine_band) for f in linear_formats)
    if not cos >= cos_limit:
        rep.add("numeric", "logits", f"end-to-end logits cosine {cos:.4f} is below {cos_limit} for "
                                     f"{'+'.join(sorted(linear_formats))}")
    result.update(logits_cosine=round(cos, 5), top1_agreement=round(top1, 4), cosine_limit=cos_limit,
                  tokens=list(ids.shape))
    if text is not None:
        # on real text the dequantized model also quantizes each W8A8 layer's input as SGLang's kernel does, so
        # that its perplexity is the served one's (docs/gpu-results.md §10); the block and logits checks above
        # compare weights only
        from .sensitivity import quantize_inputs

        hooks = [quantize_inputs(model, name, m.format, m.params, {s: found[t.name] for s, t in m.tensors.items()})
                 for name, m in manifest.modules.items() if m.kind == "linear"]
        try:
            result["text"] = text_check([directory, base], base_model, model, Path(text), thresholds, rep)
        finally:
            for h in hooks:
                if h is not None:
                    h.remove()
    return result


def _module_findings(manifest, mod_errors: dict, thresholds: dict, rep) -> dict:
    worst: dict[str, dict] = {}
    for name, err in mod_errors.items():
        if name.endswith("#fold"):
            name = name[: -len("#fold")]
            limit = thresholds.get("fold", FOLD_ERROR)
            err, with_base = err
            fold = worst.setdefault("awq-fold", {"error": 0.0})
            fold["error"] = round(max(fold["error"], err), 5)
            if not (err <= limit or err < FOLD_RATIO * with_base):
                rep.add("numeric", name, f"its norm does not match the scales AWQ folded into it (implied-norm "
                                         f"mismatch {err:.4f} > {limit}, the base model's own norm {with_base:.4f}): "
                                         f"the norm comes from another source")
            continue
        if err is None:
            continue
        fmt = manifest.modules[name].format
        error, band, rtn = err
        band = thresholds.get("module", {}).get(fmt, band)
        w = worst.setdefault(fmt, {"error": 0.0, "ratio_to_rtn": 0.0})
        w["error"] = round(max(w["error"], error), 5)
        w["ratio_to_rtn"] = round(max(w["ratio_to_rtn"], error / rtn if rtn else 0.0), 3)
        if not error <= band:
            rep.add("numeric", name, f"weight error {error:.4f} vs the base exceeds {band:.4f} for {fmt} "
                                     f"(round-to-nearest in its scheme gets {rtn:.4f} on this weight): it decodes "
                                     f"wrongly (zero convention, packing, scale or norm from another source)")
    return dict(sorted(worst.items()))


def _block_findings(manifest, b_in: dict, b_out: dict, q_out: dict, thresholds: dict, rep) -> dict:
    formats_by_layer: dict[int, set] = {}
    for mod in manifest.modules.values():
        if mod.kind == "linear" and mod.layer is not None:
            formats_by_layer.setdefault(mod.layer, set()).add(mod.format)
    blocks = []
    for i in sorted(b_out):
        # relative to what the block adds to the residual stream: the pass-through part would hide errors
        err = float((q_out[i] - b_out[i]).norm() / (b_out[i] - b_in[i]).norm())
        fmts = sorted(formats_by_layer.get(i, {"unquantized"}))
        limit = max(thresholds.get("block", {}).get(f, FORMATS[f].block_error_band) for f in fmts)
        blocks.append({"layer": i, "formats": fmts, "rel_error": round(err, 5), "limit": limit})
        if not err <= limit:
            rep.add("numeric", f"model.layers.{i}", f"block output error {err:.4f} exceeds {limit} for "
                                                  f"{'+'.join(fmts)}: a module of this block decodes wrongly")
    return {"blocks": blocks}


TEXT_WINDOW, TEXT_MAX_TOKENS = 256, 4096


def text_check(tokenizer_dirs: list[Path], base_model, model, text: Path, thresholds: dict, rep) -> dict:
    """Perplexity of the base and of the dequantized model (its W8A8 layers' inputs quantized as served) on real
    text, and the mean KL(base ‖ model) of the next-token distributions (teacher-forced, windows of 256 tokens, the
    first 4096 tokens of the file)."""
    import torch

    words = read_text("--text", text)
    tok = load_tokenizer("--text", tokenizer_dirs)
    ids = tok(words, return_tensors="pt", add_special_tokens=False).input_ids[0][:TEXT_MAX_TOKENS]
    if ids.numel() < 16:
        raise UserError(f"--text {text}: only {ids.numel()} tokens; give at least a paragraph of text")
    nll_b = nll_q = kl = 0.0
    n = 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, TEXT_WINDOW):
            window = ids[start:start + TEXT_WINDOW + 1][None]
            if window.shape[1] < 2:
                break
            lb = torch.log_softmax(base_model(input_ids=window[:, :-1]).logits.float(), -1)
            lq = torch.log_softmax(model(input_ids=window[:, :-1]).logits.float(), -1)
            target = window[:, 1:, None]
            nll_b -= float(lb.gather(-1, target).sum())
            nll_q -= float(lq.gather(-1, target).sum())
            kl += float(token_kl(lb, lq).sum())
            n += target.numel()
    import math

    out = {"file": str(text), "tokens": n, "perplexity_base": round(math.exp(nll_b / n), 4),
           "perplexity": round(math.exp(nll_q / n), 4), "kl": round(kl_mean(kl, n), 6)}
    limit = thresholds.get("kl")
    if limit is not None and not out["kl"] <= limit:
        rep.add("numeric", "text", f"KL to the base on {text.name} is {out['kl']:.4f}, above --threshold kl={limit}")
    return out
