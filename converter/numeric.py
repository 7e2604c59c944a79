"""Reference dequantization of any module of any checkpoint, through its format module (one place for the math)."""
from __future__ import annotations

from .checkpoint import Checkpoint
from .formats import FORMATS, Scheme
from .safetensors_io import load_tensor


def dequantize(scheme: Scheme, tensors: dict, out_f: int, in_f: int):
    """tensors: suffix → TensorInfo. Returns float32 [out, in]."""
    loaded = {s: load_tensor(t) for s, t in tensors.items() if s != "bias"}
    return FORMATS[scheme.format].dequantize(loaded, scheme.params, out_f, in_f)


def dequantize_from_manifest(ck: Checkpoint, module: dict):
    """A module of a converted directory, as its manifest entry describes it."""
    tensors = {s: ck.tensors[t["name"]] for s, t in module["tensors"].items()}
    out_f, in_f = module["shape"]
    return dequantize(Scheme.of(module["format"], **module["params"]), tensors, out_f, in_f)


def rel_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
