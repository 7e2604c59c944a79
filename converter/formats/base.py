"""The contract every format module fulfils; build, verify and the runtime shim use only this.

A *scheme* is (format name, params). Params are plain JSON values and go verbatim into the manifest. A format owns:
which tensor suffixes a module has, their dtypes/shapes (invariants), a reference dequantizer, how TP may split it,
and any exact rewrite of stored bytes (e.g. GPTQ v2 → v1 zero points).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import UserError
from ..safetensors_io import load_stacked

FLOAT_DTYPES = ("BF16", "F16", "F32")
# how a converted directory is laid out: mpconvert's own (config.json names the runtime shim; every format in its
# native SGLang layout) or an ordinary compressed-tensors checkpoint (build --to compressed-tensors; ct_export.py)
MP_LAYOUT, CT_LAYOUT = "mpconvert", "compressed-tensors"
LAYOUTS = (MP_LAYOUT, CT_LAYOUT)


class Scheme(NamedTuple):
    """A format and its params (a named tuple: immutable, and hashed in C — a DeepSeek-V3-sized job looks schemes up
    hundreds of thousands of times)."""
    format: str
    params_json: str  # canonical JSON: hashable and comparable

    @classmethod
    def of(cls, fmt: str, **params: Any) -> "Scheme":
        return cls(fmt, json.dumps(params, sort_keys=True))

    @property
    def params(self) -> dict:
        return dict(_parsed(self.params_json))  # a copy: callers may extend it (output_params does)

    def describe(self) -> str:
        p = self.params
        return FORMATS[self.format].describe(p)


@lru_cache(maxsize=4096)
def _parsed(params_json: str) -> dict:
    """A DeepSeek-V3-sized job asks for the params of a few schemes some 350k times: parse each once."""
    return json.loads(params_json)


@dataclass(frozen=True)
class Expect:
    """What one tensor of a module must look like. dtypes: allowed safetensors dtypes."""

    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    alt_shapes: tuple[tuple[int, ...], ...] = ()  # other accepted shapes (e.g. a scalar scale as [] or [1])

    def accepts(self, dtype: str, shape) -> bool:
        return dtype in self.dtypes and (tuple(shape) == self.shape or tuple(shape) in self.alt_shapes)


class Params(BaseModel):
    """A format's params as the manifest records them: typed, nothing unknown, no coercion (a JSON true is not 1)."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ProducerConfig(BaseModel):
    """A producer's quantization_config as this format reads it: the fields it uses are typed and checked, the rest
    (producer metadata) ignored."""
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


def first_error(e: ValidationError) -> str:
    """pydantic's first error as 'field.path: message'."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    return f"{loc}: {msg}" if loc else msg


def parse_config(model: type[BaseModel], data, where: str):
    """Validate a producer's config (or part of one) into `model`; a violation is one UserError naming the field."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: quantization_config must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{where}: quantization_config.{first_error(e)}; fix the config or re-export the "
                        f"checkpoint") from None


def positive_scales(module: str, suffix: str, s) -> str | None:
    """Every scale a format multiplies by must be a positive finite number (the README promises it). `s`: a numpy
    array (what the value checks load) or a float torch tensor."""
    s = np.asarray(s, dtype=np.float64) if isinstance(s, np.ndarray) else s.double().numpy()
    if not np.isfinite(s).all():
        return f"{module}.{suffix} has NaN or infinite scales"
    if not (s > 0).all():
        return f"{module}.{suffix} has zero or negative scales"
    return None


class ConfigReader:
    """Reads one producer family's checkpoints: its config (quantization_config.quant_method in `quant_methods`)
    and, per module, which scheme its tensors are in. Every Format is one (for the quant methods its producers
    write); compressed-tensors, a container of several formats, is another (formats/compressed_tensors.py)."""
    kind: str = ""  # how a source read by it is described (its quant_method family)
    quant_methods: tuple[str, ...] = ()

    def read_config(self, qc: dict, where: str):
        """The producer's config, parsed and checked (a UserError naming the field when it is wrong)."""
        return None

    def scheme_of(self, module: str, tensors: dict, config, where: str) -> "Scheme | None":
        """The scheme of a module whose tensors are in this reader's layout; None when they are not."""
        return None


class Format(ConfigReader):
    name: str = ""
    params_model: type[Params] = Params
    # every tensor suffix a module of this format may store (besides bias); anything else is refused, not guessed
    suffixes: tuple[str, ...] = ()
    # the suffixes check_values reads: small tensors (scales, zeros, g_idx), cheap enough to check on every build
    value_tensors: tuple[str, ...] = ()
    # True where the producer folds activation scales into the previous op (norms, v_proj→o_proj, up→down),
    # which couples modules across sources (layout.py)
    folds_scales: bool = False
    # SGLang 0.5.17's runner for this format's FusedMoE method: "triton" (drops top-k slots whose id is -1 when the
    # layer has more experts than it holds — how expert parallelism and mixed-format expert groups skip others'
    # experts) or "marlin" (GPTQ/AWQ: SGLang passes its kernel no expert map, so -1 is not known to be skipped)
    sglang_moe_runner: str = "triton"
    # why this format's experts cannot be one of several format groups of a MoE layer (runtime_shim/mixed_experts.py),
    # or "" where they can
    expert_group_problem: str = ""
    # the model dtypes (SGLang's --dtype) in which SGLang 0.5.17's MoE kernel for this format runs, or () for any
    # (rules.model_dtypes: build refuses a model no dtype serves, the shim a dtype that does not)
    moe_model_dtypes: tuple[str, ...] = ()
    # numeric bands of verify --numeric (fidelity.py): a module's weight error against the base may be rtn_factor ×
    # what round-to-nearest in its own scheme gets on the same weight (never below module_floor); a decoder block's
    # output error up to block_error_band (its least precise format's); the end-to-end logits cosine at least
    # logits_cosine_band (the model's least precise format's). Calibrated on the real fixtures (tests print them).
    rtn_factor: float = 1.5
    module_floor: float = 1e-6
    block_error_band: float = 1e-4
    logits_cosine_band: float = 0.9999

    def __init__(self):
        self._valid_params: set[str] = set()

    def describe(self, p: dict) -> str:
        return self.name

    def folds(self, p: dict) -> bool:
        """Whether modules of this scheme carry folded activation scales (folds_scales; a repack keeps its source's)."""
        return self.folds_scales

    def expected(self, p: dict, out_f: int, in_f: int) -> dict[str, Expect]:
        raise NotImplementedError

    def dequantize(self, t: dict, p: dict, out_f: int, in_f: int):
        """Reference dequantizer: stored tensors → float32 weight [out, in]."""
        raise NotImplementedError

    def kernel_problem(self, p: dict, out_parts: list[int], in_part: int, in_full: int, split_out: bool,
                       split_in: bool, moe: bool) -> str | None:
        """Why SGLang's native kernel for this scheme cannot take a layer as one rank holds it, or None.
        out_parts: the output sizes of the layer's fused parts on the rank (q, k, v; gate, up; one part unfused);
        in_part: its input size on the rank, in_full before any split; split_out / split_in: whether TP split the
        output (column parallel) / the input (row parallel); moe: an expert layer (FusedMoE), whose out_parts are
        [intermediate, intermediate] for gate/up and whose in_part is the intermediate size for down."""
        return None

    def value_suffixes(self, p: dict) -> tuple[str, ...]:
        """The suffixes check_values reads (small: scales, zeros, g_idx)."""
        return self.value_tensors

    def rewrite(self, suffix: str, p: dict) -> tuple[str, Callable] | None:
        """An exact byte rewrite applied while copying: (its name, as the manifest records it; numpy array → numpy
        array of the same dtype and shape — no torch for a rewrite of integers), or None for a verbatim copy."""
        return None

    def serve_problem(self, module: str, t: dict, p: dict, layout: str = MP_LAYOUT) -> str | None:
        """Why this module, valid as stored, cannot be written in `layout` for a native SGLang kernel (t: its value
        tensors, as check_values gets them), or None."""
        return None

    # a scheme with no native SGLang kernel in the layout written, but a lossless rewrite into another format that
    # has one (asymmetric GPTQ → compressed-tensors WNA16 with zero points; for a compressed-tensors export, GPTQ
    # and AWQ → WNA16): repack() names the scheme written, repack_from maps each written tensor to the stored one it
    # comes from, repack_tensors() makes them (exact integer and layout operations only; build proves every
    # repacked module dequantizes to exactly its source's weight)
    repack_from: dict[str, str] = {}

    def repack(self, p: dict, layout: str = MP_LAYOUT) -> "Scheme | None":
        return None

    def repack_tensors(self, t: dict, p: dict, out_f: int, in_f: int) -> dict:
        raise NotImplementedError

    def output_params(self, p: dict, model_type: str, layout: str = MP_LAYOUT) -> dict:
        """Params as written (what the manifest records): after `rewrite`, and after any change of layout that the
        target runtime needs for this model type, or that the directory's layout needs."""
        return p

    def output_suffix(self, suffix: str, p: dict, model_type: str, layout: str = MP_LAYOUT) -> str:
        """The tensor's suffix as written, for the layout `output_params` gives (bytes unchanged)."""
        return suffix

    def ct_group(self, p: dict) -> dict | None:
        """This scheme as a compressed-tensors config group (weights, input_activations, format; no targets), or
        None where compressed-tensors has no such scheme. The export writes it; SGLang's compressed-tensors config
        built from it is what the shim hands such layers to."""
        return None

    def sglang_config(self, p: dict) -> tuple[str, dict] | None:
        """SGLang's native quantization method for this scheme: (registry name, the config dict its `from_config`
        takes). None: unquantized."""
        raise NotImplementedError

    def sglang_methods(self, p: dict, moe: bool) -> tuple[str, str | None]:
        """The quant-method class SGLang 0.5.17 binds for this scheme (FusedMoE when `moe`), and its scheme class
        where the method carries one (None: not checked). `verify --engine sglang` expects each layer to get these."""
        raise NotImplementedError

    def ct_methods(self, p: dict, moe: bool) -> tuple[str, str | None]:
        """sglang_methods for a compressed-tensors export (SGLang's own compressed-tensors config, no shim): the
        same wherever the shim hands this scheme to that config too."""
        return self.sglang_methods(p, moe)

    def round_to_nearest(self, w, p: dict):
        """w (float32 [out, in]) quantized by plain round-to-nearest in this scheme and dequantized: the yardstick
        of what the scheme can do on this weight (fidelity.module_band)."""
        return w

    def quantize_activations(self, x, p: dict, t: dict):
        """What SGLang's kernel for this scheme does to a layer's input before the GEMM, emulated in float32 (x
        [..., in]; t: the module's tensors, loaded, for a static input scale): identity for weight-only formats.
        Plan measures and evaluates a recipe with it, so that a W8A8 layer costs what it costs when served."""
        return x

    def rtn_error(self, w, p: dict) -> float:
        q = self.round_to_nearest(w.float(), p)
        return float((q.double() - w.double()).norm() / w.double().norm().clamp(min=1e-30))

    def check_params(self, p) -> None:
        """Raise ValueError('field: problem') unless p is a valid params object of this format. Validated once per
        distinct params (a manifest repeats a few schemes over tens of thousands of modules)."""
        try:
            key = json.dumps(p, sort_keys=True)
        except (TypeError, ValueError):
            key = None
        if key is not None and key in self._valid_params:
            return
        try:
            self.params_model.model_validate(p)
        except ValidationError as e:
            raise ValueError(first_error(e)) from None
        if key is not None:
            self._valid_params.add(key)

    def check_values(self, module: str, t: dict, p: dict) -> str | None:
        """Value-level invariants on the `value_tensors`, loaded as numpy arrays (safetensors_io.load_array: cheap,
        no torch); a problem description or None."""
        return None

    def check_values_many(self, names: list[str], stacked: dict, p: dict) -> list[tuple[str, str]]:
        """check_values for many modules of one scheme whose value tensors have the same shapes (a MoE model's
        experts: 41k in a DeepSeek-V3-sized job), given each value tensor of all of them stacked on a new first axis
        (module i's is stacked[suffix][i]): (module, problem) for each that has one. A format whose invariants are
        all universal ("every scale > 0") checks them once on the stack (all_values_ok) and goes module by module
        only when that fails, to name the culprits."""
        if len(names) > 1 and self.all_values_ok(stacked, p):
            return []
        return [(name, problem) for i, name in enumerate(names)
                if (problem := self.check_values(name, module_values(stacked, i), p))]

    def serve_problems(self, names: list[str], stacked: dict, p: dict, layout: str) -> list[tuple[str, str]]:
        """serve_problem of many modules, their value tensors stacked as check_values_many gets them."""
        return [(name, problem) for i, name in enumerate(names)
                if (problem := self.serve_problem(name, module_values(stacked, i), p, layout))]

    def all_values_ok(self, stacked: dict, p: dict) -> bool:
        """Whether every module passes check_values, given its value tensors stacked on a new first axis — only
        ever True when each would; False (the default) when unsure."""
        return False


@lru_cache(maxsize=4096)
def value_suffixes(scheme: Scheme) -> tuple[str, ...]:
    """Format.value_suffixes of a scheme, once per scheme: planning and verify ask it of every linear module (45k in a
    DeepSeek-V3-sized job, a handful of schemes)."""
    return FORMATS[scheme.format].value_suffixes(scheme.params)


def module_values(stacked: dict, i: int) -> dict:
    """Module i's value tensors out of a batch stacked on a leading axis (views, no copies; a scalar tensor stays a
    0-d array, as the checks expect, not a numpy scalar)."""
    return {s: a[i, ...] for s, a in stacked.items()}


VALUE_BATCH = 256  # modules whose small value tensors are loaded and checked together (bounds the memory)


def check_values_batched(modules: Iterable[tuple[str, "Scheme", dict]], serve_layout: str | None = None
                         ) -> dict[str, list[tuple[str, str]]]:
    """Format.check_values of many modules — (name, scheme, value suffix → TensorInfo) — in batches of one scheme and
    shapes (Format.check_values_many), their tensors read together (load_stacked); with serve_layout, serve_problems
    too. Returns module → its problems, each ("values" or "serve", message). Build's planning and verify both check
    values this way."""
    batches: dict[tuple, list[tuple[str, dict]]] = {}
    for name, scheme, values in modules:
        batches.setdefault((scheme, tuple((s, t.dtype, t.shape) for s, t in values.items())), []).append(
            (name, values))
    problems: dict[str, list[tuple[str, str]]] = {}
    for (scheme, _), members in batches.items():
        fmt, params, suffixes = FORMATS[scheme.format], scheme.params, list(members[0][1])
        for i in range(0, len(members), VALUE_BATCH):
            chunk = members[i:i + VALUE_BATCH]
            names = [n for n, _ in chunk]
            stacked = dict(zip(suffixes, load_stacked([[v[s] for _, v in chunk] for s in suffixes])))
            for n, problem in fmt.check_values_many(names, stacked, params):
                problems.setdefault(n, []).append(("values", problem))
            if serve_layout is not None:
                for n, problem in fmt.serve_problems(names, stacked, params, serve_layout):
                    problems.setdefault(n, []).append(("serve", problem))
    return problems


FORMATS: dict[str, Format] = {}
READERS: dict[str, ConfigReader] = {}  # quantization_config.quant_method → its reader


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return register_reader(fmt)


def register_reader(reader):
    for m in reader.quant_methods:
        READERS[m] = reader
    return reader


def check_expected(scheme: Scheme, module: str, tensors: dict, out_f: int, in_f: int, where: str) -> None:
    """Every expected tensor present with the right dtype and shape; nothing unexpected (bias allowed). Decided once
    per distinct (scheme, weight shape, tensors' dtypes and shapes): a MoE model repeats a few thousand-fold."""
    problem = _expected_problem(scheme, out_f, in_f, tuple((s, t.dtype, t.shape) for s, t in tensors.items()))
    if problem:
        raise UserError(f"{where}: {problem.replace('{module}', module)}")


@lru_cache(maxsize=4096)
def _expected_problem(scheme: Scheme, out_f: int, in_f: int, found: tuple) -> str | None:
    """check_expected's finding with "{module}" where the module's name goes, or None."""
    fmt, tensors = FORMATS[scheme.format], {s: (dtype, shape) for s, dtype, shape in found}
    exp = fmt.expected(scheme.params, out_f, in_f)
    for suffix, e in exp.items():
        if suffix not in tensors:
            return f"{{module}}.{suffix} is missing ({fmt.name} needs {sorted(exp)}); the checkpoint is incomplete"
        dtype, shape = tensors[suffix]
        if not e.accepts(dtype, shape):
            return (f"{{module}}.{suffix} is {dtype}{list(shape)}, {fmt.name} for a [{out_f}, {in_f}] weight needs "
                    f"{'/'.join(e.dtypes)}{list(e.shape)}; the checkpoint does not match its config")
    extra = set(tensors) - set(exp) - {"bias"}
    if extra:
        return (f"{{module}} has unexpected tensors {sorted(extra)} for {fmt.name}; mpconvert does not know what they "
                f"mean, so it will not guess")
    if "bias" in tensors and (tensors["bias"][1] != (out_f,) or tensors["bias"][0] not in FLOAT_DTYPES):
        dtype, shape = tensors["bias"]
        return f"{{module}}.bias is {dtype}{list(shape)}, expected a float [{out_f}]"
    return None


def ct_config(group: dict) -> dict:
    """A compressed-tensors quantization_config of one group (Format.ct_group) over every Linear: what the shim hands
    a layer of that scheme to (SGLang's own compressed-tensors config, built with its from_config)."""
    return {"quant_method": "compressed-tensors", "format": group["format"], "quantization_status": "compressed",
            "ignore": [], "config_groups": {"group_0": {"targets": ["Linear"], **group}}}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
