"""Numeric fidelity: the converted model, dequantized on CPU with each format's reference dequantizer, against the
bf16 base — per decoder block on the base's own hidden states, and end to end (logits cosine, top-1 agreement).

The model runs in transformers (float32). Dequantized weights go into a temporary checkpoint with the base's names
and config, loaded by transformers itself, so MoE expert fusion and name conversion stay transformers' business.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .checkpoint import Checkpoint
from .formats import Scheme
from .errors import UserError
from .layout import role_of
from .numeric import dequantize, rel_error
from .safetensors_io import TensorInfo, load_tensor

# Relative error of what each decoder block adds to the residual stream, ‖ŷ−y‖/‖y−x‖,, by the least precise format in the block, and the lowest
# end-to-end logits cosine. Calibrated on the real fixtures (tests/test_verify.py prints the measured values) with
# headroom; a format bug (wrong zero convention, missed AWQ interleave, a norm from the wrong source) lands far out.
BLOCK_ERROR = {"unquantized": 1e-4, "int8": 0.10, "fp8": 0.25, "gptq": 0.40, "awq": 0.40}
# ‖Ŵ−W‖/‖W‖ of one dequantized weight vs the bf16 base (DESIGN.md §3 measured 0.09–0.17 int4, 0.027 fp8, 0.008
# int8; decoding v1 as v2 gives 0.29, skipping the AWQ interleave 1.24). AWQ weights are compared as norm·W, since
# AWQ moved a scale from the weight into the norm; AWQ o_proj/down_proj (scaled by v_proj/up_proj) only per block.
MODULE_ERROR = {"unquantized": 1e-6, "int8": 0.03, "fp8": 0.06, "gptq": 0.25, "awq": 0.25}
# AWQ fold consistency: the per-input-channel scale s AWQ moved into a consumer (least squares of Ŵ against W,
# per column) implies the norm the consumer needs, base_norm / s; the norm in the directory must be that one.
# Measured on the fixtures: 0.007–0.011 when right, 0.027–0.08 with the base model's norm.
FOLD_ERROR = 0.02
LOGITS_COSINE = {"unquantized": 0.9999, "int8": 0.99, "fp8": 0.97, "gptq": 0.85, "awq": 0.85}


def _dequantized_checkpoint(directory: Path, manifest: dict, found: dict[str, TensorInfo], base: Path,
                            tmp: Path) -> None:
    import torch
    from safetensors.torch import save_file

    base_ck = Checkpoint.open(base, "base")
    state = {n: load_tensor(t).float() for n, t in base_ck.tensors.items()}
    base_state = dict(state)
    errors = {}
    for name, mod in manifest["modules"].items():
        tensors = {s: found[t["name"]] for s, t in mod["tensors"].items()}
        if mod["kind"] == "linear":
            w = dequantize(Scheme.of(mod["format"], **mod["params"]), tensors, *mod["shape"])
            key = f"{name}.weight"
            if key not in state:
                raise UserError(f"--base {base}: has no {key}; pass the base model this directory was built from")
            errors[name] = module_error(name, mod, w, base_state, manifest, found)
            fold = fold_error(name, mod, w, base_state, manifest, found)
            if fold is not None:
                errors[name + "#fold"] = fold
            state[key] = w.to(torch.float32)
            if "bias" in tensors:
                state[f"{name}.bias"] = load_tensor(tensors["bias"]).float()
        else:
            for s, t in tensors.items():
                state[f"{name}.{s}"] = load_tensor(t).float()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg))
    return errors


def _consumed_norm(name: str, role, manifest: dict, found: dict):
    norm = "input_layernorm" if role.stage == "attn_in" else "post_attention_layernorm"
    nname = f"{name.split('.self_attn')[0].split('.mlp')[0].split('.block_sparse_moe')[0]}.{norm}"
    return nname, load_tensor(found[manifest["modules"][nname]["tensors"]["weight"]["name"]]).float()


def fold_error(name: str, mod: dict, w, base_state: dict, manifest: dict, found: dict) -> float | None:
    role = role_of(name)
    # only consumers whose rows carry no second fold (v_proj and up_proj also carry o_proj's / down_proj's scales)
    if mod["format"] != "awq" or role.stage is None or role.slot not in ("q", "k", "gate", "w1"):
        return None
    nname, n_out = _consumed_norm(name, role, manifest, found)
    ref = base_state[f"{name}.weight"]
    s = (w * ref).sum(0) / (ref * ref).sum(0)
    implied = base_state[f"{nname}.weight"] / s
    return rel_error(n_out, implied)


def module_error(name: str, mod: dict, w, base_state: dict, manifest: dict, found: dict) -> float | None:
    """‖Ŵ−W‖/‖W‖ against the base weight (norm-corrected for AWQ consumers); None where not comparable."""
    ref = base_state[f"{name}.weight"]
    role = role_of(name)
    if mod["format"] == "awq":
        if role.stage is None:
            return None
        nname, n_out = _consumed_norm(name, role, manifest, found)
        w, ref = w * n_out, ref * base_state[f"{nname}.weight"]
    return rel_error(w, ref)


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


def numeric_check(directory: Path, manifest: dict, found: dict[str, TensorInfo], base: Path, rep,
                  thresholds: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    block_band = {**BLOCK_ERROR, **thresholds.get("block", {})}
    cos_band = {**LOGITS_COSINE, **thresholds.get("cosine", {})}
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    vocab = base_model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 32), generator=g)
    b_in, b_out, b_logits = _capture(base_model, ids)
    del base_model
    with tempfile.TemporaryDirectory(prefix="mpconvert-verify-") as t:
        mod_errors = _dequantized_checkpoint(directory, manifest, found, base, Path(t))
        model = AutoModelForCausalLM.from_pretrained(t, dtype=torch.float32).eval()
    _, q_out, _ = _capture(model, ids, replace=b_in)
    _, _, q_logits = _capture(model, ids)
    mod_band = {**MODULE_ERROR, **thresholds.get("module", {})}
    worst: dict[str, float] = {}
    for name, err in mod_errors.items():
        if name.endswith("#fold"):
            name = name[: -len("#fold")]
            worst["awq-fold"] = max(worst.get("awq-fold", 0.0), err)
            if not err <= thresholds.get("fold", FOLD_ERROR):
                rep.add("numeric", name, f"its norm does not match the scales AWQ folded into it (implied-norm "
                                         f"mismatch {err:.4f} > {FOLD_ERROR}): the norm comes from another source")
            continue
        fmt = manifest["modules"][name]["format"]
        if err is None:
            continue
        worst[fmt] = max(worst.get(fmt, 0.0), err)
        if not err <= mod_band[fmt]:
            rep.add("numeric", name, f"weight error {err:.4f} vs the base exceeds {mod_band[fmt]} for {fmt}: it "
                                     f"decodes wrongly (zero convention, packing, scale or norm from another source)")
    formats_by_layer: dict[int, set] = {}
    for mod in manifest["modules"].values():
        if mod["kind"] == "linear" and mod["layer"] is not None:
            formats_by_layer.setdefault(mod["layer"], set()).add(mod["format"])
    blocks = []
    for i in sorted(b_out):
        # relative to what the block adds to the residual stream: the pass-through part would hide errors
        err = float((q_out[i] - b_out[i]).norm() / (b_out[i] - b_in[i]).norm())
        fmts = sorted(formats_by_layer.get(i, {"unquantized"}))
        limit = max(block_band[f] for f in fmts)
        blocks.append({"layer": i, "formats": fmts, "rel_error": round(err, 5), "limit": limit})
        if not err <= limit:
            rep.add("numeric", f"model.layers.{i}", f"block output error {err:.4f} exceeds {limit} for "
                                                  f"{'+'.join(fmts)}: a module of this block decodes wrongly")
    all_fmts = {m["format"] for m in manifest["modules"].values() if m["kind"] == "linear"}
    cos = float(torch.nn.functional.cosine_similarity(q_logits.flatten(0, 1), b_logits.flatten(0, 1), dim=-1).mean())
    top1 = float((q_logits.argmax(-1) == b_logits.argmax(-1)).float().mean())
    cos_limit = min(cos_band[f] for f in all_fmts)
    if not cos >= cos_limit:
        rep.add("numeric", "logits", f"end-to-end logits cosine {cos:.4f} is below {cos_limit} for "
                                     f"{'+'.join(sorted(all_fmts))}")
    return {"module_error_max": {k: round(v, 5) for k, v in sorted(worst.items())}, "blocks": blocks, "logits_cosine": round(cos, 5), "top1_agreement": round(top1, 4),
            "cosine_limit": cos_limit, "tokens": list(ids.shape)}
