"""Reference dequantization of any module of any checkpoint, through its format module (one place for the math)."""
from __future__ import annotations

from .checkpoint import Checkpoint
from .formats import FORMATS, Scheme
from .safetensors_io import load_tensor


def dequantize(scheme: Scheme, tensors: dict, out_f: int, in_f: int):
    """tensors: suffix → TensorInfo. Returns float32 [out, in]."""
    loaded = {s: load_tensor(t) for s, t in tensors.items() if s != "bias"}
    return FORMATS[scheme.format].dequantize(loaded, scheme.params, out_f, in_f)


def dequantize_from_manifest(ck: Checkpoint, module):
    """A module of a converted directory, as its manifest entry describes it: a ModuleEntry, or its JSON with the
    scheme written in ("format", "params": tests/helpers.manifest_json)."""
    if isinstance(module, dict):
        tensors = {s: ck.tensors[t["name"]] for s, t in module["tensors"].items()}
        return dequantize(Scheme.of(module["format"], **module["params"]), tensors, *module["shape"])
    tensors = {s: ck.tensors[t.name] for s, t in module.tensors.items()}
    return dequantize(module.scheme, tensors, *module.shape)


def rel_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def token_kl(base_logp, logp, base_p=None):
    """KL(base ‖ model) of each position's next-token distribution, from log-probabilities [..., vocab] — the one
    definition plan's measurements, its evaluation and verify --text share. base_p: base_logp.exp(), when the caller
    keeps it across many calls."""
    return ((base_logp.exp() if base_p is None else base_p) * (base_logp - logp)).sum(-1)
