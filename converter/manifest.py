"""The manifest: the single source of truth about a converted directory, written by build, read by verify, inspect,
serve and the runtime shim — always through the typed model here (`load_manifest` / `Manifest.dumps`), never as a
raw dict.

Schema (manifest_version 3; compact JSON, absent optional fields omitted; docs/architecture.md):
  model        model_type, num_hidden_layers, num_attention_heads, num_key_value_heads, num_experts
  built_for_tp / built_for_ep / built_for_dp? / built_for_moe_dense_tp?   the parallel sizes build checked every
               split for (moe_dense_tp: --moe-dense-tp-size, written only when build was given it; dp: DP
               attention, written only when build was given --dp > 1)
  layout       "mpconvert" (config.json names the runtime shim) or "compressed-tensors" (build --to
               compressed-tensors: config.json is an ordinary compressed-tensors config, ct_export.py)
  recipe       the recipe as validated (paths as written); routing_files: file → sha256 (they decide formats)
  sources      label → path as written, kind, producer, description, fingerprint, files (shard → header digest)
  config       the base config.json as build wrote it, less quantization_config (verify diffs config.json with it)
  files        side file (tokenizer, generation config, …) → sha256
  schemes      [{format, params}]: every distinct scheme once, in order of first use (modules point into it: a
               DeepSeek-V3-sized manifest repeats a handful of schemes over ~45k modules)
  units        SGLang layer prefix → format, params, members; a mixed_experts unit: groups [{format, params, experts}]
  modules      HF module name → kind, unit, layer?, expert?, scheme_id (index into schemes), source, chosen_by,
               shape? [out, in], tensors: suffix → row of the tensor table
  shards       the shard files, sorted
  tensors      the tensor table, one column each: name, dtype, shape, sha256, shard (index into shards); rewrite and
               renamed_from as {row: value} for the rows that have one. Every row belongs to exactly one module.
  totals       bytes, linear_bytes, linear_weights, bits_per_weight, by_format: format → modules, bytes, weights
Every integer (count, index, dimension) is at most 2^63 - 1; the totals agree with themselves. A scheme's and a
unit's params are validated against their format's own schema (Format.params_model), each distinct scheme once.
Version 2 (session 9 and before) stored format and params in every module and one object per tensor in its module.
Deterministic: no timestamps, no absolute paths.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
import msgspec
from msgspec import UNSET, Meta, UnsetType

from .errors import UserError
from .formats import FORMATS
from . import ct_export
from .formats.base import CT_LAYOUT, LAYOUTS, MP_LAYOUT
from .recipe import format_ids
from .safetensors_io import DTYPE_SIZE, nbytes_of

MANIFEST = "mpconvert_manifest.json"
MANIFEST_VERSION = 3
QUANT_METHOD = "mpconvert"
# a MoE unit whose experts come in several formats: its "groups" list each format's params and expert ids
MIXED_EXPERTS = "mixed_experts"
# where the runtime shim puts a mixed-experts layer's per-format FusedMoE layers (`<unit>.expert_groups.<i>`, i the
# group's index in the manifest); verify --engine looks them up by that name
EXPERT_GROUPS = "expert_groups"

Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
# Every count, index and dimension fits an int64 (what numpy and every reader of the table compute in): a larger
# one is a manifest finding, not an OverflowError deep in a check.
INT64_MAX = 2 ** 63 - 1
Count = Annotated[int, Meta(ge=0, le=INT64_MAX)]
Positive = Annotated[int, Meta(ge=1, le=INT64_MAX)]


class _Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A manifest record: typed by msgspec, which decodes and checks the whole manifest in C (at 171k tensors, a
    DeepSeek-V3-sized job, 0.4 s against 1.3 s for json.loads and pydantic); strict (a JSON true is not 1, 1.0 is not
    an int), nothing unknown; optional fields left out when None (the manifest's own when UNSET: it writes its
    layout and the tensor table its empty maps, as the pydantic models did)."""


def _scheme_ok(fmt: str, params: dict) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    try:
        FORMATS[fmt].check_params(params)
    except ValueError as e:
        raise ValueError(f"params of {fmt}: {e}") from None


class TensorEntry:
    """One row of the manifest's tensor table, as readers see it (read-only; made by Manifest's validation)."""
    __slots__ = ("name", "dtype", "shape", "sha256", "shard", "rewrite", "renamed_from")

    def __init__(self, name: str, dtype: str, shape: list[int], sha256: str, shard: str, rewrite: str | None,
                 renamed_from: str | None):
        self.name, self.dtype, self.shape, self.sha256 = name, dtype, shape, sha256
        self.shard, self.rewrite, self.renamed_from = shard, rewrite, renamed_from

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


Row = Annotated[str, Meta(pattern=r"^(0|[1-9][0-9]*)$")]


class _Rows:
    """The validated tensor table as TensorEntry rows (made one at a time, on demand)."""

    def __init__(self, t: "TensorTable", shards: list[str]):
        self.t, self.shards = t, shards
        self.rewrite, self.renamed = ({int(r): v for r, v in col.items()} for col in (t.rewrite, t.renamed_from))

    def entry(self, r: int) -> TensorEntry:
        t = self.t
        return TensorEntry(t.name[r], t.dtype[r], t.shape[r], t.sha256[r], self.shards[t.shard[r]],
                           self.rewrite.get(r), self.renamed.get(r))

    @functools.cached_property
    def row_bytes(self) -> list[int]:
        """TensorEntry.nbytes of every row, without making the rows: one pass over two columns (totals asks for the
        bytes of 171k rows in a DeepSeek-V3-sized job; one call each cost a fifth of a second)."""
        return list(map(nbytes_of, self.t.dtype, self.t.shape))


class TensorTable(_Entry, omit_defaults=False):
    """Every tensor of the directory, one column per field (171k rows in a DeepSeek-V3-sized job: columns parse in
    half the time of one object per tensor); rewrite / renamed_from only for the rows that have one."""
    name: list[str]
    dtype: list[Literal[tuple(DTYPE_SIZE)]]  # type: ignore[valid-type]
    shape: list[list[Count]]
    sha256: list[Sha256]
    shard: list[Count]  # index into Manifest.shards
    rewrite: dict[Row, str] = {}
    renamed_from: dict[Row, str] = {}

    def __post_init__(self):
        n = len(self.name)
        for col in ("dtype", "shape", "sha256", "shard"):
            if len(getattr(self, col)) != n:
                raise ValueError(f"column {col} has {len(getattr(self, col))} rows, name has {n}")
        for col in ("rewrite", "renamed_from"):
            past = [r for r in getattr(self, col) if int(r) >= n]
            if past:
                raise ValueError(f"{col}: row {past[0]} is past the table ({n} rows)")
        if len(set(self.name)) != n:
            raise ValueError("a tensor name appears twice")


class SchemeEntry(_Entry, dict=True):
    format: str
    params: dict[str, Any]

    def __post_init__(self):
        _scheme_ok(self.format, self.params)

    @functools.cached_property
    def scheme(self):
        """As the formats take it (hashable, canonical params); made once per scheme, not per module."""
        from .formats import Scheme

        return Scheme.of(self.format, **self.params)


class ModuleEntry(_Entry, dict=True, kw_only=True):
    kind: Literal["linear", "norm", "router", "embedding"]
    unit: str
    layer: Optional[Count] = None
    expert: Optional[Count] = None
    scheme_id: Count
    source: str
    chosen_by: str
    shape: Optional[Annotated[list[Positive], Meta(min_length=2, max_length=2)]] = None
    rows: dict[str, Count] = msgspec.field(name="tensors")  # suffix → row of the tensor table
    # Its scheme (schemes[scheme_id]) and the tensor table, set by Manifest's validation in the instance's __dict__
    # ("linked", "_table"), and its rows and tensor names once made (cached properties): never read from or written to
    # JSON.

    def __post_init__(self):
        if self.kind == "linear" and self.shape is None:
            raise ValueError("a linear module records its shape [out, in]")
        if not self.rows:
            raise ValueError("a module has at least one tensor")

    @functools.cached_property
    def tensors(self) -> dict[str, TensorEntry]:
        """suffix → its row of the tensor table."""
        table = self.__dict__["_table"]
        return {suffix: table.entry(r) for suffix, r in self.rows.items()}

    @functools.cached_property
    def tensor_names(self) -> dict[str, str]:
        """suffix → tensor name, straight from the table's name column: what verify needs of every module, without
        a TensorEntry for each of 171k rows."""
        names = self.__dict__["_table"].t.name
        return {suffix: names[r] for suffix, r in self.rows.items()}

    @property
    def format(self) -> str:
        return self.linked.format

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.linked.params)  # a copy: the scheme is shared by every module that uses it

    @property
    def scheme(self):
        return self.linked.scheme

    def weight_bytes(self) -> int:
        """Bytes of everything but the bias (what a format costs), from the table's columns: inspect asks it of every
        module (45k in a DeepSeek-V3-sized job), and making their 171k rows took a third of its time."""
        row_bytes = self.__dict__["_table"].row_bytes
        return sum(row_bytes[r] for s, r in self.rows.items() if s != "bias")


class ExpertGroup(_Entry):
    format: str
    params: dict[str, Any]
    experts: Annotated[list[Count], Meta(min_length=1)]

    def __post_init__(self):
        _scheme_ok(self.format, self.params)


class UnitEntry(_Entry):
    format: str
    params: dict[str, Any]
    members: Annotated[list[str], Meta(min_length=1)]
    groups: Optional[list[ExpertGroup]] = None

    def __post_init__(self):
        if self.format == MIXED_EXPERTS:
            if not self.groups or self.params:
                raise ValueError("a mixed_experts unit has groups and no params")
        else:
            _scheme_ok(self.format, self.params)
            if self.groups is not None:
                raise ValueError(f"a {self.format} unit has no groups")

    def schemes(self) -> list[tuple[str, dict]]:
        """This unit's (format, params): one, or a mixed-experts unit's one per group."""
        return [(g.format, g.params) for g in self.groups] if self.groups else [(self.format, self.params)]

    def describe(self) -> str:
        """fp8 / 'mixed_experts: fp8 [0-3], gptq [4-7]'"""
        if not self.groups:
            return self.format
        return MIXED_EXPERTS + ": " + ", ".join(f"{g.format} [{format_ids(g.experts)}]" for g in self.groups)


class ModelEntry(_Entry):
    model_type: str
    num_hidden_layers: Positive
    num_attention_heads: Positive
    num_key_value_heads: Positive
    num_experts: Count

    def info(self):
        from .layout import ModelInfo

        return ModelInfo(self.model_type, self.num_hidden_layers, self.num_attention_heads,
                         self.num_key_value_heads, self.num_experts)


class SourceEntry(_Entry):
    path: str
    kind: str
    producer: str
    description: str
    fingerprint: Sha256
    files: dict[str, Sha256]


class FormatTotal(_Entry):
    modules: Positive
    bytes: Count
    weights: Positive


class Totals(_Entry, kw_only=True):
    """What totals() computed at build time; readers such as inspect print it as it is, so it must at least agree
    with itself (verify also recomputes it from the modules)."""
    bytes: Count
    linear_bytes: Count
    linear_weights: Count
    bits_per_weight: Optional[float] = None
    by_format: dict[str, FormatTotal]

    def __post_init__(self):
        lin_bytes = sum(d.bytes for d in self.by_format.values())
        lin_weights = sum(d.weights for d in self.by_format.values())
        if (self.linear_bytes, self.linear_weights) != (lin_bytes, lin_weights):
            raise ValueError(f"linear_bytes {self.linear_bytes} and linear_weights {self.linear_weights} are not the "
                             f"sums over by_format ({lin_bytes}, {lin_weights})")
        bpw = round(8 * lin_bytes / lin_weights, 4) if lin_weights else None
        if self.bits_per_weight != bpw:
            raise ValueError(f"bits_per_weight {self.bits_per_weight} is not 8 × linear_bytes / linear_weights "
                             f"({bpw})")
        if self.bytes < lin_bytes:
            raise ValueError(f"bytes {self.bytes} is less than linear_bytes {lin_bytes}")


class Manifest(_Entry, kw_only=True, omit_defaults=False):
    manifest_version: Literal[3]
    mpconvert_version: str
    model: ModelEntry
    built_for_tp: Positive
    built_for_ep: Positive
    built_for_dp: Union[Positive, UnsetType] = UNSET  # DP attention's size when build checked for one (absent: none)
    # --moe-dense-tp-size when build was given one (absent: SGLang's default, the dense MLPs split over tp)
    built_for_moe_dense_tp: Union[Positive, UnsetType] = UNSET
    layout: Literal[LAYOUTS] = MP_LAYOUT  # type: ignore[valid-type]
    recipe: dict[str, Any]
    routing_files: Union[dict[str, Sha256], UnsetType] = UNSET
    sources: dict[str, SourceEntry]
    config: dict[str, Any]
    files: dict[str, Sha256]
    schemes: list[SchemeEntry]
    units: dict[str, UnitEntry]
    modules: dict[str, ModuleEntry]
    shards: list[str]
    tensors: TensorTable
    totals: Totals

    def __post_init__(self):
        """Each module's scheme and tensor rows, checked and linked: every row belongs to exactly one module (checked
        on all rows at once; the rows become TensorEntry objects only when a module's tensors are asked for —
        inspect never asks)."""
        n, t = len(self.schemes), self.tensors
        rows, shards = len(t.name), self.shards
        if t.shard and max(t.shard) >= len(shards):
            raise ValueError(f"tensors.shard: an index past the {len(shards)} shards")
        owned = np.fromiter((r for m in self.modules.values() for r in m.rows.values()), np.int64)
        if owned.size != rows or (rows and (owned.max() >= rows or np.bincount(owned, minlength=rows).max() > 1)):
            self._name_bad_row()
        table, schemes = _Rows(t, shards), self.schemes
        for name, m in self.modules.items():
            if m.scheme_id >= n:
                raise ValueError(f"modules.{name}.scheme_id {m.scheme_id}: the manifest has {n} schemes")
            m.__dict__.update(linked=schemes[m.scheme_id], _table=table)

    def _name_bad_row(self) -> None:
        """Why the rows the modules point to are not each of the table's rows exactly once, naming the first."""
        rows, owner = len(self.tensors.name), {}
        for name, m in self.modules.items():
            for suffix, r in m.rows.items():
                if r >= rows:
                    raise ValueError(f"modules.{name}.tensors.{suffix}: row {r} is past the table ({rows} rows)")
                if r in owner:
                    raise ValueError(f"modules.{name}.tensors.{suffix}: row {r} is {owner[r]}'s too")
                owner[r] = name
        lost = next(r for r in range(rows) if r not in owner)
        raise ValueError(f"tensors: row {lost} ({self.tensors.name[lost]}) belongs to no module")

    def dumps(self) -> bytes:
        """Compact JSON, fields in schema order, maps in build order (deterministic). At 171k tensors (a
        DeepSeek-V3-sized job) indentation made it 70 MB and 2.9 s to write; compact it is 37 MB and 0.1 s.
        `mpconvert inspect` is the human view."""
        return _ENCODER.encode(self) + b"\n"

    def formats(self) -> list[str]:
        return sorted({f for u in self.units.values() for f, _ in u.schemes()})

    def tensor_bytes(self) -> int:
        """Bytes of every tensor of the table (each row belongs to exactly one module), from its columns."""
        return sum(map(nbytes_of, self.tensors.dtype, self.tensors.shape))

    def built_for(self):
        """The parallel sizes build checked every split at (rules.Parallel; not checked here: verify reports a claim
        SGLang would refuse)."""
        from .rules import Parallel

        return Parallel(self.built_for_tp, self.built_for_ep, self.built_for_dp or 1,
                        self.built_for_moe_dense_tp or None)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every module's weight shape as recorded: a linear's [out, in] (whatever its format stores), else its weight
        tensor's (what layout.config_problems holds a config.json against)."""
        table_shapes = self.tensors.shape
        return {name: tuple(m.shape) if m.shape is not None else tuple(table_shapes[m.rows["weight"]])
                for name, m in self.modules.items() if m.shape is not None or "weight" in m.rows}

    def linears(self) -> list:
        """Every linear module as the shared rules (rules.py) see it; modules without a known role are left out
        (verify reports them)."""
        from .layout import role_of
        from .rules import Linear

        out = []
        for name, m in self.modules.items():
            role = role_of(name)
            if m.kind == "linear" and role is not None and role.kind == "linear":
                out.append(Linear(name, role, m.scheme, m.source, m.chosen_by, *m.shape, "bias" in m.rows))
        return out


class ManifestError(UserError):
    """The manifest is unreadable or breaks its schema: for verify a finding, for every other reader an error."""


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Manifest)


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The typed manifest, decoded and checked in one pass (msgspec); anything else is one ManifestError naming the
    first field that breaks the schema."""
    try:
        try:
            return _DECODER.decode(raw)
        except msgspec.ValidationError as e:
            error = e
        data = json.loads(raw)  # (valid JSON: msgspec parsed it) — to name what broke the schema
    except (msgspec.DecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where}: not valid JSON ({e}); rebuild instead of editing") from None
    except RecursionError:
        raise ManifestError(f"{where}: JSON nested deeper than its readers follow; rebuild instead of editing") \
            from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object; rebuild instead of editing")
    version = data.get("manifest_version")
    if type(version) is int and version > MANIFEST_VERSION:
        raise ManifestError(f"{where}: manifest_version {version} is newer than this mpconvert reads "
                            f"({MANIFEST_VERSION}; written by mpconvert {data.get('mpconvert_version', '?')}); "
                            f"upgrade mpconvert, or rebuild with this one")
    if version != MANIFEST_VERSION:
        raise ManifestError(f"{where}: manifest_version {version!r} is not {MANIFEST_VERSION}; "
                            f"rebuild with this mpconvert")
    raise ManifestError(f"{where}: breaks the manifest schema at {schema_error(error, data, Manifest)}; rebuild "
                        f"instead of editing")


def as_json(entry: _Entry) -> dict:
    """A manifest record as plain JSON values (what --json output and messages print)."""
    return msgspec.to_builtins(entry)


# ---- naming what breaks the schema --------------------------------------------------------------------------------
# msgspec's errors say where, as `$.modules[...].tensors`: a map's key is left out (the decoder does not keep it).
# Only when there is an error, the map is searched for its first entry that does not decode alone — the one the
# decoder, going in the same order, stopped at — and the path is written as pydantic wrote it: modules.<name>.tensors.
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MESSAGES = ((re.compile(r"Object missing required field `(.+)`"), "required field is missing"),
             (re.compile(r"Object contains unknown field `(.+)`"), "unknown field"))


def schema_error(e: msgspec.ValidationError, data, root: type) -> str:
    """`field.path: message` for the first error msgspec found decoding `data` (JSON values) as `root`."""
    message, _, at = str(e).partition(" - at `")
    path, value, kind = [], data, root
    for field, index in _STEP.findall(at.rstrip("`").removeprefix("$")):
        kind = _unwrap(kind)
        if field:
            value = value.get(field) if isinstance(value, dict) else None
            kind = next((f.type for f in msgspec.structs.fields(kind) if f.encode_name == field), Any) \
                if isinstance(kind, type) and issubclass(kind, msgspec.Struct) else Any
            path.append(field)
        elif index == "...":
            key_kind, kind = typing.get_args(kind) or (Any, Any)
            key = next((k for k, v in value.items() if not (_fits(k, key_kind) and _fits(v, kind))), None) \
                if isinstance(value, dict) else None
            path.append(str(key))
            value = value.get(key) if isinstance(value, dict) else None
        else:
            kind = (typing.get_args(kind) or (Any,))[0]
            value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
            path.append(index)
    kind = _unwrap(kind)
    if isinstance(value, dict) and typing.get_origin(kind) is dict:  # a key of the map broke the schema
        key_kind = typing.get_args(kind)[0]
        path += [str(k) for k in value if not _fits(k, key_kind)][:1]
    for pattern, text in _MESSAGES:
        if (m := pattern.fullmatch(message)):
            path.append(m.group(1))
            message = text
    message = message.replace("`", "")
    return f"{'.'.join(path)}: {message}" if path else message


def _unwrap(kind):
    """The type under Annotated[...] and Optional[...]."""
    while typing.get_origin(kind) in (Annotated, typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _fits(value, kind) -> bool:
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return False
    return True


def require_converted(directory: Path) -> Path:
    """`directory` as verify, inspect and serve take it: a directory holding a manifest (one message for each)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory; pass a directory written by `mpconvert build`")
    if not (directory / MANIFEST).is_file():
        raise UserError(f"{directory}: no {MANIFEST}; pass a directory written by `mpconvert build`")
    return directory / MANIFEST


def load_manifest(directory: Path) -> tuple[Manifest, bytes]:
    """The typed manifest of a converted directory and its raw bytes (whose sha256 config.json records)."""
    path = require_converted(directory)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return parse_manifest(raw, str(path)), raw


def quantization_config(manifest_bytes: bytes, formats: list[str]) -> dict:
    """What config.json says, so that SGLang hands the model to the runtime shim (quant_method "mpconvert")."""
    return {"quant_method": QUANT_METHOD, "manifest": MANIFEST, "manifest_version": MANIFEST_VERSION,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "formats": sorted(formats)}


def config_json(manifest: Manifest, raw: bytes) -> dict:
    """config.json exactly as build writes it: the base's config, the layout's quantization_config (the shim's,
    naming the manifest by its sha256; or an export's compressed-tensors config, the sha256 then under
    `mpconvert`). verify compares config.json with it."""
    digest = hashlib.sha256(raw).hexdigest()
    config = dict(manifest.config)
    if manifest.layout == CT_LAYOUT:
        config["quantization_config"] = ct_export.quantization_config(manifest)
        config[ct_export.MANIFEST_KEY] = {"manifest": MANIFEST, "manifest_sha256": digest}
    else:
        config["quantization_config"] = quantization_config(raw, manifest.formats())
    return config


# the keys of config.json that build writes for the layout (config_json); the rest is the base's config
WRITTEN_KEYS = ("quantization_config", ct_export.MANIFEST_KEY)


def recorded_digest(config: dict) -> str | None:
    """The manifest sha256 a config.json records (in either layout)."""
    for holder in (config.get(k) for k in WRITTEN_KEYS):
        if isinstance(holder, dict) and isinstance(holder.get("manifest_sha256"), str):
            return holder["manifest_sha256"]
    return None


def build_manifest(plan, shard_of: dict[str, str], digests: dict[str, str], config: dict,
                   files: dict[str, str]) -> Manifest:
    from . import __version__

    modules, schemes = {}, {}  # schemes: Scheme → index, in order of first use
    shards = sorted(set(shard_of.values()))
    shard_id = {f: i for i, f in enumerate(shards)}
    names, dtypes, shapes, sha256s, shard_ids, rewrite, renamed = [], [], [], [], [], {}, {}
    for m in plan.modules:
        rows = {}
        for s, t in sorted(m.tensors.items()):  # rows in module order, each module's by suffix
            rows[s] = r = len(names)
            names.append(t.name)
            dtypes.append(t.dtype)
            shapes.append(list(t.shape))
            sha256s.append(digests[t.name])
            shard_ids.append(shard_id[shard_of[t.name]])
            if t.rewrite_name is not None:
                rewrite[str(r)] = t.rewrite_name
            if t.renamed_from is not None:
                renamed[str(r)] = t.renamed_from
        modules[m.name] = {
            "kind": m.role.kind, "unit": m.role.unit, "layer": m.role.layer, "expert": m.role.expert,
            "scheme_id": schemes.setdefault(m.scheme, len(schemes)), "source": m.source, "chosen_by": m.why,
            "shape": [m.out_features, m.in_features] if m.role.kind == "linear" else None, "tensors": rows,
        }
    sources = {}
    for label, src in sorted(plan.sources.items()):
        raw = plan.recipe.base if label == "base" else plan.recipe.sources[label]
        sources[label] = {"path": raw, "kind": src.kind, "producer": src.producer, "description": src.describe(),
                          "fingerprint": src.ckpt.fingerprint(), "files": dict(sorted(src.ckpt.file_fingerprints.items()))}
    return _validated({
        "manifest_version": MANIFEST_VERSION, "mpconvert_version": __version__,
        "model": {"model_type": plan.info.model_type, "num_hidden_layers": plan.info.num_layers,
                  "num_attention_heads": plan.info.num_heads, "num_key_value_heads": plan.info.num_kv_heads,
                  "num_experts": plan.info.num_experts},
        **{f"built_for_{k}": v for k, v in plan.parallel.named().items()},
        "layout": plan.layout,
        "recipe": json.loads(plan.recipe.model_dump_json()),
        **({"routing_files": plan.recipe.routing_files()} if plan.recipe.routing_files() else {}),
        "sources": sources, "config": config, "files": files,
        "schemes": [{"format": s.format, "params": s.params} for s in schemes], "units": plan.units, "modules": modules,
        "shards": shards, "tensors": {"name": names, "dtype": dtypes, "shape": shapes, "sha256": sha256s, "shard": shard_ids,
                                       "rewrite": rewrite, "renamed_from": renamed}, "totals": totals(plan.modules, plan.total_bytes),
    })


def _validated(data: dict) -> Manifest:
    """The manifest build made, checked by the schema as every reader will check it (a plan that breaks it is a bug
    here, not the user's)."""
    try:
        return msgspec.convert(data, Manifest)
    except msgspec.ValidationError as e:
        raise RuntimeError(f"build made a manifest that breaks its schema at {schema_error(e, data, Manifest)}") \
            from None


def totals(modules, total_bytes: int) -> dict:
    """Bytes and bits per weight by format over the linear modules (from plans or manifest entries alike: each has
    kind/format/out×in and its tensors' byte counts)."""
    by_format: dict[str, dict] = {}
    for m in modules:
        if m.kind != "linear":
            continue
        d = by_format.setdefault(m.format, {"modules": 0, "bytes": 0, "weights": 0})
        d["modules"] += 1
        d["bytes"] += m.weight_bytes()
        d["weights"] += m.shape[0] * m.shape[1]
    lin_bytes = sum(d["bytes"] for d in by_format.values())
    lin_weights = sum(d["weights"] for d in by_format.values())
    return {"bytes": total_bytes, "linear_bytes": lin_bytes, "linear_weights": lin_weights,
            "bits_per_weight": round(8 * lin_bytes / lin_weights, 4) if lin_weights else None,
            "by_format": dict(sorted(by_format.items()))}
