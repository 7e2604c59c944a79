"""Open a checkpoint as a *source*: detect its format from its own config and see every module as a scheme.

Which format a module is in comes from the checkpoint's config (what its producer declared) checked against the
tensors actually present; a module whose tensors are a plain float `weight` (+ bias) is unquantized (ignored layers,
lm_head, routers, norms).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .errors import UserError
from .formats import Scheme
from .formats.awq import AWQ
from .formats.base import FLOAT_DTYPES
from .formats.compressed_tensors import CompressedTensorsConfig
from .formats.fp8 import FP8
from .formats.gptq import GPTQ
from .layout import canonical_module
from .safetensors_io import TensorInfo

# Every tensor suffix a module may carry in a supported format; anything else is refused rather than guessed.
KNOWN_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "qweight", "qzeros", "scales", "g_idx", "weight",
                  "bias")


def split_tensor_name(name: str) -> tuple[str, str]:
    module, _, suffix = name.rpartition(".")
    if not module or suffix not in KNOWN_SUFFIXES:
        return "", name
    return module, suffix


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

    def describe(self) -> str:
        schemes = sorted({m.scheme.describe() for m in self.modules.values() if m.scheme.format != "unquantized"})
        return f"{self.kind} [{'; '.join(schemes) or 'unquantized'}] by {self.producer}"


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


class _Detector:
    """Maps (module, its tensors) → Scheme for one source, from the source's declared config."""

    def __init__(self, qc: dict | None, where: str):
        self.where = where
        self.kind = "unquantized"
        self.ct = None
        self.params: dict = {}
        if not qc:
            return
        if not isinstance(qc, dict):
            raise UserError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
        method = qc.get("quant_method") or ("gptq" if "bits" in qc else "")
        if not isinstance(method, str):
            raise UserError(f"{where}: quantization_config.quant_method must be a string, got {method!r}")
        method = method.lower()
        if method == "gptq":
            self.kind, self.params = "gptq", GPTQ.params_from_config(qc, where)
        elif method == "awq":
            self.kind, self.params = "awq", AWQ.params_from_config(qc, where)
        elif method == "fp8":
            self.kind, self.params = "fp8", FP8.params_from_config(qc, where)
        elif method == "w8a8_int8":
            self.kind = "w8a8_int8"
        elif method == "compressed-tensors":
            self.kind, self.ct = "compressed-tensors", CompressedTensorsConfig(qc, where)
        else:
            raise UserError(f"{where}: quant_method {method!r} is not supported (supported: gptq, awq, fp8, "
                            f"w8a8_int8, compressed-tensors, or none)")

    def scheme(self, module: str, tensors: dict[str, TensorInfo]) -> Scheme:
        suffixes = set(tensors) - {"bias"}
        w = tensors.get("weight")
        if suffixes == {"weight"} and w is not None and w.dtype in FLOAT_DTYPES:
            return Scheme.of("unquantized", dtype=w.dtype)
        if self.kind == "gptq" and "qweight" in suffixes and "g_idx" in suffixes:
            return Scheme.of("gptq", **self.params)
        if self.kind == "awq" and "qweight" in suffixes:
            return Scheme.of("awq", **self.params)
        if self.kind == "fp8" and w is not None and w.dtype == "F8_E4M3":
            block = self.params["block"]
            if "weight_scale_inv" in suffixes:
                if not block:
                    raise UserError(f"{self.where}: {module} has weight_scale_inv but config.json has no "
                                    f"weight_block_size")
                return Scheme.of("fp8", layout="native", strategy="block", block=list(block),
                                 activation=self.params["activation"])
            return Scheme.of("fp8", layout="native", strategy="tensor", block=None,
                             activation=self.params["activation"])
        if self.kind == "w8a8_int8" and w is not None and w.dtype == "I8":
            return Scheme.of("int8", layout="native", activation="dynamic")
        if self.ct is not None and w is not None and w.dtype in ("F8_E4M3", "I8"):
            s = self.ct.scheme_for(module)
            if s is None:
                raise UserError(f"{self.where}: {module} is quantized ({w.dtype}) but no config group targets it")
            return s
        raise UserError(f"{self.where}: {module} has tensors {sorted(tensors)} that do not fit its declared "
                        f"format ({self.kind}); the checkpoint and its config disagree")


def open_source(label: str, path, model_type: str) -> Source:
    ck = Checkpoint.open(path, label)
    where = f"source {label!r} ({ck.path})" if label != "base" else f"base ({ck.path})"
    qc = ck.quantize_config
    det = _Detector(qc, where)
    grouped: dict[str, dict[str, TensorInfo]] = {}
    for name, info in ck.tensors.items():
        module, suffix = split_tensor_name(name)
        if not module:
            raise UserError(f"{where}: tensor {name!r} is of a kind mpconvert does not know (suffix not in "
                            f"{', '.join(KNOWN_SUFFIXES)}); it will not guess what it means")
        grouped.setdefault(canonical_module(module, model_type), {})[suffix] = info
    src = Source(label, ck, det.kind, _producer(qc))
    for module in grouped:
        src.modules[module] = ModuleView(module, det.scheme(module, grouped[module]), grouped[module])
    return src
