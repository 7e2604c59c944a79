"""Open a checkpoint as a *source*: detect its format from its own config and see every module as a scheme.

Which format a module is in comes from the checkpoint's config (what its producer declared) checked against the
tensors actually present; a module whose tensors are a plain float `weight` (+ bias) is unquantized (ignored layers,
lm_head, routers, norms).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter

from .checkpoint import Checkpoint
from .errors import UserError
from .formats import FORMATS, READERS, Scheme
from .formats.unquantized import UNQUANTIZED
from .layout import EXTRA_TENSORS, module_renamer
from .manifest import QUANT_METHOD
from .safetensors_io import TensorInfo

# Every tensor suffix a module may carry in a supported format (each format lists its own); anything else is refused
# rather than guessed.
KNOWN_SUFFIXES = tuple(sorted({s for f in FORMATS.values() for s in f.suffixes} | set(EXTRA_TENSORS)))


_KNOWN = {s: s for s in KNOWN_SUFFIXES}  # membership, and one string object per suffix for 400k tensors
# Scales of the KV cache or attention's activations (compressed-tensors' kv_cache_scheme: self_attn.k_scale/v_scale;
# older exports: k_proj.output_scale, kv_scale), which SGLang reads under --kv-cache-dtype fp8. mpconvert carries
# weights only: dropping them would leave SGLang a scale of 1.0 for that cache, so a source holding them is refused.
KV_CACHE_SUFFIXES = ("k_scale", "v_scale", "kv_scale", "q_scale", "prob_scale", "output_scale")


@dataclass
class ModuleView:
    """One module as one checkpoint stores it."""

    name: str
    scheme: Scheme
    tensors: dict[str, TensorInfo]


@dataclass
class Source:
    label: str
    ckpt: Checkpoint
    kind: str  # unquantized | gptq | awq | fp8 | w8a8_int8 | compressed-tensors
    producer: str
    modules: dict[str, ModuleView] = field(default_factory=dict)
    description: str = ""  # describe(), once every module is read (kept when Plan.forget_unplanned drops modules)

    def describe(self) -> str:
        if not self.description:
            distinct = {m.scheme for m in self.modules.values()}  # a few, over 89k modules in a DeepSeek-V3 source
            schemes = sorted({s.describe() for s in distinct if s.format != "unquantized"})
            self.description = f"{self.kind} [{'; '.join(schemes) or 'unquantized'}] by {self.producer}"
        return self.description


def _producer(qc: dict | None) -> str:
    if not qc:
        return "unquantized"
    meta = qc.get("meta")
    q = meta.get("quantizer") if isinstance(meta, dict) else None
    if q:
        return ", ".join(map(str, q)) if isinstance(q, list) else str(q)
    if qc.get("quant_method") == "compressed-tensors":
        return f"llm-compressor (compressed-tensors {qc.get('version', '?')})"
    return str(qc.get("quant_method") or "auto-gptq")


def _reader(qc, where: str, base: bool = False):
    """The reader of this source's config and its parsed config: (None, None) for an unquantized checkpoint."""
    if not qc:
        return None, None
    if not isinstance(qc, dict):
        raise UserError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method") or ("gptq" if "bits" in qc else "")  # auto-gptq's quantize_config.json
    if not isinstance(method, str):
        raise UserError(f"{where}: quantization_config.quant_method must be a string, got {method!r}")
    reader = READERS.get(method.lower())
    if method.lower() == QUANT_METHOD:  # a user mixing again from an earlier output
        fix = ("point base at the bf16/fp16 checkpoint it was built from (its manifest's sources.base)" if base else
               "take its modules from the checkpoints it was built from (its manifest's sources), or build it with "
               "`--to compressed-tensors`, which reads as any compressed-tensors source")
        raise UserError(f"{where}: is an mpconvert output in its own layout (served through the runtime shim), which "
                        f"mpconvert does not read back; {fix}")
    if reader is None:
        raise UserError(f"{where}: quant_method {method.lower()!r} is not supported (supported: "
                        f"{', '.join(sorted(READERS))}, or none)")
    return reader, reader.read_config(qc, where)


def _scheme(reader, config, module: str, tensors: dict[str, TensorInfo], where: str) -> Scheme:
    """A plain float module is unquantized whatever the source; anything else must be in the source's layout."""
    scheme = UNQUANTIZED.scheme_of(module, tensors, None, where)
    if scheme is None and reader is not None:
        scheme = reader.scheme_of(module, tensors, config, where)
    if scheme is None:
        raise UserError(f"{where}: {module} has tensors {sorted(tensors)} that do not fit its declared format "
                        f"({reader.kind if reader else 'unquantized'}); the checkpoint and its config disagree")
    return scheme


def open_source(label: str, path, model_type: str) -> Source:
    return source_of(label, Checkpoint.open(path, label), model_type)


def source_of(label: str, ck: Checkpoint, model_type: str) -> Source:
    """An opened checkpoint seen as a source: every module with its scheme (model_type maps names, e.g. Mixtral's
    experts)."""
    where = f"source {label!r} ({ck.path})" if label != "base" else f"base ({ck.path})"
    qc = ck.quantize_config
    reader, config = _reader(qc, where, label == "base")
    grouped: dict[str, dict[str, TensorInfo]] = {}
    # split column by column (C loops over 400k names at DeepSeek-V3 size); Python only to group them
    parts = list(map(str.rpartition, ck.tensors, repeat(".")))
    modules, suffixes = list(map(itemgetter(0), parts)), list(map(itemgetter(2), parts))
    if not _KNOWN.keys() >= set(suffixes) or "" in set(modules):
        name = next(n for n, (m, _, s) in zip(ck.tensors, parts) if not m or s not in _KNOWN)
        if name.rpartition(".")[2] in KV_CACHE_SUFFIXES and name.rpartition(".")[0]:
            scheme = " (config.json's kv_cache_scheme)" if isinstance(qc, dict) and qc.get("kv_cache_scheme") else ""
            raise UserError(f"{where}: tensor {name!r} is a KV-cache quantization scale{scheme}, which mpconvert does "
                            f"not carry (SGLang would serve that cache with a scale of 1.0 under --kv-cache-dtype "
                            f"fp8); use this model quantized without a KV-cache scheme (its weights do not depend on it)")
        raise UserError(f"{where}: tensor {name!r} is of a kind mpconvert does not know (suffix not in "
                        f"{', '.join(KNOWN_SUFFIXES)}); it will not guess what it means")
    rename = module_renamer(model_type)
    if rename is not None:
        modules = list(map(rename, modules))
    for module, suffix, info in zip(modules, map(_KNOWN.__getitem__, suffixes), ck.tensors.values()):
        grouped.setdefault(module, {})[suffix] = info  # (one str object per suffix, from _KNOWN)
    src = Source(label, ck, reader.kind if reader else "unquantized", _producer(qc))
    for module, tensors in grouped.items():
        src.modules[module] = ModuleView(module, _scheme(reader, config, module, tensors, where), tensors)
    src.describe()
    return src
