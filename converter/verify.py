"""verify: prove a converted directory complete, consistent, shardable and (with --numeric) faithful.

Reads the manifest written by build (through its typed model; a manifest that breaks the schema is a finding, never
a crash) and never re-derives it. Each problem is one Finding; the CLI exits 1 when there is any. Checks:
  manifest   — the schema (every field typed, every format's params valid); the manifest agrees with itself: each
               module's role, unit, layer and expert as its name says, sources it names, tensor names, the unit table
               and totals recomputed from the modules
  config     — config.json: quantization_config exactly as build wrote it (the manifest's sha256 included), every
               other field as recorded at build time (a changed field is named; compared as JSON: true ≠ 1 ≠ 1.0),
               tokenizer and other side files by sha256
  structure  — index ↔ shards ↔ manifest (the index's total_size too); every shard's header read as strictly as
               safetensors does (appended bytes, gaps, overlaps) and its __metadata__ as written; dtype/shape; sha256
               of every tensor and no NaN/inf in any float tensor (--fast skips both: the report says so)
  scheme     — per-format invariants (shapes, dtypes, positive finite scales, g_idx range, zero convention), finite
               norms and routers, and the shared rules (rules.py): fused units, folded scales
  tp         — every split SGLang makes at --tp/--ep and at the sizes the build was checked for, and every layer's
               kernel shape (at TP=1 too)
  numeric    — (--numeric --base) per module against what its own scheme can do, per decoder block, end-to-end
  engine     — (--engine sglang) SGLang's real classes build and load the model on CPU through the shim
"""
from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import asdict, dataclass, field, replace
from itertools import compress
from pathlib import Path

import numpy as np

from . import rules
from .checkpoint import INDEX, is_weight_map, read_json, sglang_path_problem
from .collector import paused_then_kept
from .errors import UserError, and_more
from .forked import Forked
from .formats import check_expected
from .formats.base import FLOAT_DTYPES, check_values_batched, value_suffixes
from .layout import ModelInfo, check_same_architecture, config_problems, role_of, stage_norms
from .manifest import (MANIFEST, WRITTEN_KEYS, Manifest, ManifestError, as_json, config_json, parse_manifest,
                       recorded_digest, require_converted, totals)
from .safetensors_io import (PT_METADATA, TensorInfo, digest_and_scan_batches, forget_open_files, load_array,
                             read_header)

SUMMARY_ROWS = 50  # the CLI prints this many findings, then counts per check and place


@dataclass
class Finding:
    check: str
    where: str
    message: str


@dataclass
class Report:
    directory: str
    checks: list[str] = field(default_factory=list)
    hashed: bool = True
    findings: list[Finding] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    numeric: dict | None = None
    engine: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, check: str, where: str, message: str) -> None:
        self.findings.append(Finding(check, where, message))

    def add_problems(self, check: str, problems: list[rules.Problem]) -> None:
        for p in problems:
            self.add(check, p.where, p.message)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.check] = out.get(f.check, 0) + 1
        return out

    def to_json(self) -> dict:
        return {"directory": self.directory, "ok": self.ok, "checks": self.checks, "hashed": self.hashed,
                "counts": self.counts(), "findings": [asdict(f) for f in self.findings], "memory": self.memory,
                "numeric": self.numeric, "engine": self.engine}


class Progress:
    """What verify tells the CLI: the number of tensors to read, then steps of n tensors read."""

    def start(self, total: int) -> None:
        pass

    def step(self, n: int = 1) -> None:
        pass


def _differs(a, b) -> bool:
    """JSON values compared as JSON: Python's == holds True == 1 == 1.0 (a `pretraining_tp: true` edit went unseen)
    and NaN != NaN (a config holding NaN would differ from itself)."""
    return json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True)


def _first_difference(got, wrote, path: str) -> tuple[str, object, object]:
    """Where two JSON values first differ (a group's one changed field, not the whole config printed twice)."""
    if isinstance(got, dict) and isinstance(wrote, dict):
        for k in sorted(set(got) | set(wrote), key=str):
            if _differs(got.get(k, "<absent>"), wrote.get(k, "<absent>")):
                return _first_difference(got.get(k, "<absent>"), wrote.get(k, "<absent>"), f"{path}.{k}")
    if isinstance(got, list) and isinstance(wrote, list) and len(got) == len(wrote):
        for i, (a, b) in enumerate(zip(got, wrote)):
            if _differs(a, b):
                return _first_difference(a, b, f"{path}[{i}]")
    return path, got, wrote


# ---- config.json ---------------------------------------------------------------------------------------------
def check_config(d: Path, manifest: Manifest | None, raw: bytes, rep: Report) -> None:
    try:
        config = read_json(d / "config.json", "config.json", missing="missing (build writes it: SGLang reads the "
                           "model and each layer's format from it); restore it or rebuild")
    except UserError as e:
        rep.add("config", "config.json", str(e))
        return
    digest = hashlib.sha256(raw).hexdigest()
    if recorded_digest(config) != digest:
        rep.add("config", MANIFEST, "manifest was edited after build (its sha256 differs from the one config.json "
                                    "records); rebuild instead of editing")
    if manifest is None:
        return
    written = config_json(manifest, raw)
    for key in WRITTEN_KEYS:
        want, qc = written.get(key), config.get(key)
        if want is None or not isinstance(qc, dict):
            if _differs(qc, want):
                rep.add("config", f"config.json {key}", f"is {qc!r}, build wrote {want!r}; rebuild or restore it")
            continue
        for k in sorted(set(want) | set(qc)):
            if k != "manifest_sha256" and _differs(qc.get(k), want.get(k)):
                where, got, wrote = _first_difference(qc.get(k), want.get(k), f"{key}.{k}")
                rep.add("config", f"config.json {where}",
                        f"is {got!r}, build wrote {wrote!r}: SGLang reads it to pick how each layer is served; "
                        f"rebuild or restore it")
    rest = {k: v for k, v in config.items() if k not in WRITTEN_KEYS}
    shapes = manifest.weight_shapes()  # the edited config (if any) and the recorded one are held against them
    edited = [k for k in sorted(set(rest) | set(manifest.config))
              if _differs(rest.get(k, "<absent>"), manifest.config.get(k, "<absent>"))]
    misfits = config_problems(config, shapes, served=True) if edited else []
    for k in edited:
        # a value the weights leave open (a longer context) has a place that needs no edit: SGLang's launch override
        at_launch = "" if misfits else (f" (to serve with another value, restore it and pass that at launch: mpconvert "
                                        f"serve DIR -- --json-model-override-args '{{\"{k}\": …}}')")
        rep.add("config", f"config.json {k}",
                f"is {rest.get(k, '<absent>')!r}, built with {manifest.config.get(k, '<absent>')!r}: config.json was "
                f"edited after build, and it decides how SGLang builds and runs the model — restore it or rebuild"
                f"{at_launch}")
    if misfits:  # the first: one wrong count (num_hidden_layers) makes every later layer look wrong too
        rep.add("config", "config.json", f"as edited: {misfits[0]}{and_more(misfits)}")
    try:
        info = ModelInfo.from_config(manifest.config, "recorded config")
    except UserError as e:
        rep.add("manifest", "config", str(e))
    else:
        if info != manifest.model.info():
            rep.add("manifest", "model", f"records {as_json(manifest.model)} but the recorded config says "
                                         f"{info}: the manifest was edited")
        for problem in config_problems(manifest.config, shapes, served=True):
            rep.add("config", "config.json", f"{problem}: the config and the weights disagree (SGLang builds the "
                                             f"model from config.json); rebuild from a base whose config fits it")
    for name, sha in sorted(manifest.files.items()):
        p = d / name
        if not p.is_file():
            rep.add("config", name, "side file recorded at build time is missing (the server needs it); restore it")
        elif hashlib.sha256(p.read_bytes()).hexdigest() != sha:
            rep.add("config", name, "sha256 differs from the one recorded at build time: the file was edited; "
                                    "restore it or rebuild")


# ---- structure -------------------------------------------------------------------------------------------------
def _shards(d: Path, rep: Report) -> tuple[dict[str, str] | None, dict[str, TensorInfo], dict[str, str]]:
    """The index's weight map (None when it cannot be read: one finding says why), every tensor the shards hold (each
    header read strictly) and the shard of each."""
    metadata = None
    try:
        index = read_json(d / INDEX, "safetensors index", strict=True, missing="missing (build writes it: loaders "
                          "find the shards through it); restore it or rebuild")
        weight_map, metadata = index.get("weight_map"), index.get("metadata")
        if not is_weight_map(weight_map):
            raise UserError(f"{d / INDEX}: weight_map must map tensor names to shard file names; restore the index "
                            f"or rebuild")
    except UserError as e:
        rep.add("structure", INDEX, str(e))
        weight_map = None
    found: dict[str, TensorInfo] = {}
    shard_of: dict[str, str] = {}
    all_read = True
    on_disk = {p.name for p in d.glob("*.safetensors")}
    for shard in sorted(set((weight_map or {}).values()) | on_disk):
        p = d / shard
        if "/" in shard or shard.startswith(".."):
            rep.add("structure", INDEX, f"shard path {shard!r} escapes the directory")
            all_read = False
            continue
        if shard not in on_disk:
            rep.add("structure", shard, "shard listed in the index is missing")
            all_read = False
            continue
        try:
            infos, raw = read_header(p)
        except UserError as e:
            rep.add("structure", shard, str(e).removeprefix(f"{p}: "))
            all_read = False
            continue
        meta = PT_METADATA if raw.startswith(_PT_HEADER_START) else json.loads(raw).get("__metadata__")
        if meta != PT_METADATA:  # (read_header has proved the header valid JSON)
            rep.add("structure", shard, f"header __metadata__ is {meta!r}, build wrote {PT_METADATA!r} (loaders "
                                        f"such as transformers check it); restore the shard or rebuild")
        for name in infos.keys() & found.keys():
            rep.add("structure", name, f"in both {shard_of[name]} and {shard}")
        found.update(infos)
        shard_of.update(dict.fromkeys(infos, shard))
    if weight_map and all_read:  # (else the shard's own finding says why the bytes differ)
        _check_total_size(metadata, found, rep)
    return weight_map, found, shard_of


_NBYTES, _DTYPE_SHAPE = operator.attrgetter("nbytes"), operator.attrgetter("dtype", "shape")  # of a TensorInfo
_NAME = operator.attrgetter("name")
_FIRST, _SECOND, _THIRD = (operator.itemgetter(i) for i in range(3))
_PT_HEADER_START = b'{"__metadata__":' + json.dumps(PT_METADATA, separators=(",", ":")).encode() + b","


def _check_total_size(metadata, found: dict[str, TensorInfo], rep: Report) -> None:
    """The index's metadata.total_size, as build writes it: the bytes of every tensor."""
    size = metadata.get("total_size") if isinstance(metadata, dict) else metadata
    have = sum(map(_NBYTES, found.values()))
    if type(size) is not int or size != have:
        rep.add("structure", f"{INDEX} metadata.total_size", f"is {size!r}, the shards hold {have:,} bytes of "
                                                             f"tensors; restore the index or rebuild")


def check_structure(manifest: Manifest,
                    shards_read: tuple[dict[str, str] | None, dict[str, TensorInfo], dict[str, str]],
                    rep: Report) -> None:
    """Every tensor of the manifest's table where the table and the index put it, as recorded (dtype, shape);
    nothing else in the shards. `shards_read`: what _shards found."""
    weight_map, found, shard_of = shards_read
    table, shards = manifest.tensors, manifest.shards
    names = table.name
    # the whole table compared at once (column against column); tensor by tensor only to say what differs
    recorded, expected = list(map(shards.__getitem__, table.shard)), set(names)
    if weight_map is None:  # an index that cannot be read is one finding (_shards), not one more per tensor
        weight_map = dict(zip(names, recorded))
    unexpected = found.keys() - expected
    indexed = list(map(weight_map.get, names)) == recorded  # every tensor in the index, where the table says
    if not (len(found) - len(unexpected) == len(expected) and indexed  # (found ⊇ expected, counted)
            and list(map(shard_of.__getitem__, names)) == recorded
            and list(map(_DTYPE_SHAPE, map(found.__getitem__, names))) == list(zip(table.dtype,
                                                                                   map(tuple, table.shape)))):
        _structure_findings(manifest, weight_map, found, shard_of, rep)
    for name in sorted(unexpected):
        rep.add("structure", name, f"unexpected tensor in {shard_of[name]} (not in the manifest)")
    if not (indexed and len(weight_map) == len(expected)):  # (else the index lists exactly the table's tensors)
        for name in sorted(weight_map.keys() - expected - found.keys()):
            rep.add("structure", name, "listed in the index but neither in the manifest nor in any shard")


def digests_of(found: dict[str, TensorInfo], step) -> tuple[list[str], list[str]]:
    """sha256 of every tensor found, in `found`'s order, and the names of those holding a NaN or an infinity (what
    goes back from the child process: two lists, not 171k TensorInfo)."""
    digests, nonfinite = {}, []
    for done in digest_and_scan_batches(list(found.values())):  # a job's results at once: 171k tensors at V3 size
        names = list(map(_NAME, map(_FIRST, done)))
        digests.update(zip(names, map(_SECOND, done)))
        nonfinite.extend(compress(names, map(_THIRD, done)))
        step(len(done))
    return list(map(digests.__getitem__, found)), nonfinite


def _digest_findings(table, found: dict[str, TensorInfo], hashed: tuple[list[str], list[str]]) -> list[Finding]:
    """The digests of every tensor found (digests_of) against the table (compared as whole columns; a tensor whose
    dtype or shape already differs is reported for that, not again for its bytes), and no NaN or infinity in any
    float tensor."""
    digests, nonfinite = dict(zip(found, hashed[0])), set(hashed[1])
    out = []
    if [digests.get(n) for n in table.name] != table.sha256:
        for n, dtype, shape, sha in zip(table.name, table.dtype, table.shape, table.sha256):
            t = found.get(n)
            if t is not None and t.dtype == dtype and list(t.shape) == shape and digests[n] != sha:
                out.append(Finding("structure", n, "sha256 differs from the manifest: the bytes changed after build"))
    for n in (n for n in table.name if n in nonfinite):
        out.append(Finding("scheme", n, f"holds NaN or infinite {found[n].dtype} values; no served model may"))
    return out


def _structure_findings(manifest: Manifest, weight_map: dict[str, str], found: dict[str, TensorInfo],
                        shard_of: dict[str, str], rep: Report) -> None:
    """Tensor by tensor, in module order: what differs between the manifest, the index and the shards."""
    for module, m in manifest.modules.items():
        for t in m.tensors.values():
            name, info = t.name, found.get(t.name)
            if name not in weight_map:
                rep.add("structure", name, f"not in the index ({INDEX}), the manifest places it in {t.shard}; restore "
                                           f"the index or rebuild")
            elif weight_map[name] != t.shard:
                rep.add("structure", name, f"index places it in {weight_map[name]!r}, the manifest in {t.shard!r}")
            if info is None:
                rep.add("structure", name, f"missing from the shards (manifest: {module}, {t.shard})")
                continue
            if shard_of[name] != t.shard:
                rep.add("structure", name, f"found in {shard_of[name]}, the manifest says {t.shard}")
            if info.dtype != t.dtype or list(info.shape) != t.shape:
                rep.add("structure", name, f"is {info.dtype}{list(info.shape)}, the manifest records "
                                           f"{t.dtype}{t.shape}")


# ---- the manifest against itself and the shared rules ------------------------------------------------------------
def check_manifest(manifest: Manifest, linears: list[rules.Linear], rep: Report) -> None:
    roles = {name: role_of(name) for name in manifest.modules}
    for name, m in manifest.modules.items():
        role = roles[name]
        if role is None:
            rep.add("manifest", name, "is no module mpconvert knows a role for; the manifest was edited")
            continue
        if (m.kind, m.unit, m.layer, m.expert) != (role.kind, role.unit, role.layer, role.expert):
            rep.add("manifest", name, f"records kind={m.kind} unit={m.unit} layer={m.layer} expert={m.expert}, its "
                                      f"name says kind={role.kind} unit={role.unit} layer={role.layer} "
                                      f"expert={role.expert}: the manifest was edited")
        if m.source not in manifest.sources:
            rep.add("manifest", name, f"names source {m.source!r}, which the manifest does not list")
        for suffix, tensor in m.tensor_names.items():
            if tensor != f"{name}.{suffix}":
                rep.add("manifest", name, f"tensor {suffix} is recorded as {tensor!r}")
        if m.kind != "linear" and (m.format != "unquantized" or m.shape is not None):
            rep.add("manifest", name, f"a {m.kind} is unquantized and has no linear shape; recorded {m.format}")
    _check_units(manifest, linears, rep)
    rep.add_problems("scheme", rules.pair_problems(linears))
    rep.add_problems("scheme", rules.bias_problems(linears))
    rep.add_problems("scheme", rules.mla_problems(linears, manifest.model.model_type))
    rep.add_problems("scheme", rules.dtype_problems(linears, manifest.model.model_type))
    readers = rules.readers_of(roles, linears, stage_norms(manifest.modules))
    for name, m in manifest.modules.items():
        if name in readers and m.kind != "linear":
            rep.add_problems("scheme", rules.norm_problems(name, roles[name], m.source, readers[name]))
    want = totals(manifest.modules.values(), manifest.tensor_bytes())
    if as_json(manifest.totals) != json.loads(json.dumps(want)):
        rep.add("manifest", "totals", "differ from the totals of the modules it lists: the manifest was edited")


def _check_units(manifest: Manifest, linears: list[rules.Linear], rep: Report) -> None:
    """The unit table is what the modules imply (rules.by_unit / expert_groups), and the fused-unit rules hold."""
    units = rules.by_unit(linears)
    for unit in sorted(set(manifest.units) - set(units)):
        rep.add("manifest", unit, "a unit without any linear module of it")
    for unit, members in units.items():
        rep.add_problems("scheme", rules.unit_problems(unit, members))
        u = manifest.units.get(unit)
        if u is None:
            rep.add("manifest", unit, f"{members[0].name} names this unit, the unit table lacks it")
            continue
        if sorted(u.members) != sorted(m.name for m in members):
            rep.add("manifest", unit, "its member list differs from the modules that name it")
        schemes = {m.scheme for m in members}
        if len(schemes) == 1:
            (s,) = schemes
            if u.groups or (u.format, u.params) != (s.format, s.params):
                rep.add("scheme", unit, f"the unit is recorded as {u.describe()} {u.params} but its modules are "
                                        f"{s.format} {s.params}: SGLang runs one kernel per fused unit")
        else:
            groups = [(g.format, g.params, g.experts) for g in (u.groups or [])]
            want = [(s.format, s.params, ids) for s, ids in rules.expert_groups(members)]
            if groups != want:
                rep.add("scheme", unit, f"its expert groups ({u.describe()}) are not its experts' formats")


# ---- scheme invariants --------------------------------------------------------------------------------------------
def value_findings(manifest: Manifest, found: dict[str, TensorInfo]) -> list[Finding]:
    """Every module's tensors as its format expects, and the values the format's invariants cover (small tensors:
    cheap enough for --fast too; in batches, check_values_batched), reported in the manifest's order."""
    problems: dict[str, list[str]] = {}
    batched = []
    for name, m in manifest.modules.items():
        try:
            tensors = {s: found[n] for s, n in m.tensor_names.items()}
        except KeyError:
            continue  # already reported as missing
        if m.kind != "linear":
            w = tensors.get("weight")
            if w is not None and w.dtype not in FLOAT_DTYPES:
                problems[name] = [f"{name}.weight is {w.dtype}; a {m.kind} is served unquantized (BF16/F16/F32)"]
            elif m.kind in ("norm", "router") and w is not None and not np.isfinite(load_array(w)).all():
                problems[name] = [f"{name}.weight has NaN or infinite values"]
            continue
        scheme = m.scheme
        try:
            check_expected(scheme, name, tensors, *m.shape, "scheme")
        except UserError as e:
            problems[name] = [str(e).removeprefix("scheme: ")]
            continue
        batched.append((name, scheme, {s: tensors[s] for s in value_suffixes(scheme)}))
    for name, found_problems in check_values_batched(batched).items():
        problems.setdefault(name, []).extend(p for _, p in found_problems)
    return [Finding("scheme", name, problem) for name in manifest.modules for problem in problems.get(name, ())]


def check_partitions(manifest: Manifest, linears: list[rules.Linear], rep: Report, parallel: rules.Parallel) -> None:
    """SGLang's splits at the asked sizes and at the ones build checked (a manifest claiming sizes SGLang refuses, or
    a split it cannot serve, is wrong), each layer's kernel shape included."""
    info = manifest.model.info()
    rep.add_problems("tp", rules.partition_problems(linears, info, parallel))
    built = manifest.built_for()
    if built == replace(parallel, dp_lm_head=False):  # moves no split: build does not take it
        return
    claim = built.spelled("built_for_")
    try:
        built.check()
    except UserError as e:
        rep.add("manifest", MANIFEST, f"{claim}: {e}")
        return
    for p in rules.partition_problems(linears, info, built):
        rep.add("manifest", p.where, f"{claim}, but {p.message}")


def memory_report(manifest: Manifest, found: dict[str, TensorInfo], parallel: rules.Parallel) -> dict:
    """Bytes by format and per rank: a split module's share of one rank (split as SGLang splits it:
    Parallel.ranks_splitting); the MTP layers' bytes, which SGLang loads only for speculative decoding (NextN)."""
    by_format: dict[str, int] = {}
    per_rank = mtp = 0
    info = manifest.model.info()
    for name, mod in manifest.modules.items():
        nbytes = sum(found[n].nbytes for n in mod.tensor_names.values() if n in found)
        by_format[mod.format] = by_format.get(mod.format, 0) + nbytes
        if (mod.layer or 0) >= info.num_layers or (mod.layer is None and info.mtp_layer_of(name) is not None):
            mtp += nbytes
        role = role_of(name)
        if role is not None and role.parallel in ("column", "row", "vocab"):
            nbytes /= parallel.ranks_splitting(role, info.model_type)
        per_rank += nbytes
    total = sum(by_format.values())
    linear = sum(v for k, v in by_format.items() if k != "unquantized")
    t = manifest.totals
    bf16 = 2 * t.linear_weights + (t.bytes - t.linear_bytes)
    return {"bytes": total, "by_format": by_format, **parallel.named(),
            "bytes_per_rank": int(per_rank), **({"mtp_bytes": mtp} if mtp else {}),
            "bits_per_weight": t.bits_per_weight, "vs_bf16": round(total / bf16, 4) if bf16 else None,
            "quantized_bytes": linear}


def check_usage(directory: Path, parallel: rules.Parallel, base: Path | None, numeric: bool, text: Path | None,
                engine: str | None) -> None:
    tp, ep = parallel.check().tp, parallel.ep
    if engine and (parallel.dp > 1 or parallel.dense_tp is not None):
        raise UserError("--engine sglang loads the model without DP attention or --moe-dense-tp-size; check --dp / "
                        "--moe-dense-tp-size without --engine, or --engine without them")
    if numeric and base is None:
        raise UserError("--numeric needs --base BASE (the bf16 model the sources were quantized from)")
    if text is not None and not numeric:
        raise UserError("--text needs --numeric --base BASE (it measures perplexity and KL against the base)")
    if base is not None and not (Path(base) / "config.json").is_file():
        raise UserError(f"--base {base}: not a model directory (no config.json); pass the bf16 model the sources "
                        f"were quantized from")
    if text is not None and not Path(text).is_file():
        raise UserError(f"--text {text}: no such file; pass a UTF-8 text file")
    if engine is not None and engine != "sglang":
        raise UserError(f"--engine {engine}: the only engine is sglang")
    if engine and ep > 1 and (ep > tp or tp % ep):
        raise UserError(f"--engine sglang --ep {ep}: SGLang splits experts over the TP ranks; --tp must be a "
                        f"multiple of --ep (got --tp {tp})")
    require_converted(directory)
    unservable = engine and sglang_path_problem(directory)
    if unservable:
        raise UserError(f"--engine sglang: {unservable}; rename the directory")
    if text is not None:
        from .numeric import tokenizer_dir

        tokenizer_dir("--text", [directory, base])  # before any model is loaded


def check_base(base: Path, manifest: Manifest) -> None:
    """--base must be the bf16 model the directory was built from, as build checks its own base: unquantized, and
    the same architecture as the config recorded at build time."""
    from .sources import open_source

    src = open_source("--base", base, manifest.model.model_type)
    if src.kind != "unquantized":
        raise UserError(f"--base {base}: is quantized ({src.kind}); pass the bf16 model the sources were quantized "
                        f"from")
    check_same_architecture(manifest.config, src.ckpt.config, f"--base {base}",
                            "pass the base model this directory was built from")


def _cancel(*children: Forked | None) -> None:
    for child in children:
        if child is not None:
            child.cancel()


def verify(directory: Path, parallel: rules.Parallel = rules.Parallel(), hash_tensors: bool = True,
           base: Path | None = None, numeric: bool = False, thresholds: dict | None = None,
           progress: Progress | None = None, engine: str | None = None, dtype: str = "auto",
           text: Path | None = None) -> Report:
    directory = Path(directory)
    forget_open_files()  # files may have changed since an earlier operation in this process
    check_usage(directory, parallel, base, numeric, text, engine)
    progress = progress or Progress()
    rep = Report(str(directory), hashed=hash_tensors)
    rep.checks = ["structure" + ("" if hash_tensors else " (--fast: sha256 and NaN scan skipped)"), "manifest",
                  "config", "scheme", parallel.spelled()]
    raw = (directory / MANIFEST).read_bytes()  # read once: 37 MB at DeepSeek-V3 size
    # The shards' headers first: the digests need nothing else, so a child process hashes every tensor on the other
    # core (forked.py) while the manifest is parsed and checked here; once it is, a second child checks every
    # module's values and sums the bytes per rank while the table against the shards, config.json, the manifest and
    # the splits are checked here (about even halves). Each check's findings are kept apart, then reported in one
    # fixed order: config, structure, digests, manifest, values, splits.
    with paused_then_kept() as keep:
        structure, config, manifest_findings, tp_findings = (Report(rep.directory) for _ in range(4))
        shards_read = _shards(directory, structure)
        found = shards_read[1]
        progress.start(len(found))
        hashing = Forked(lambda step: digests_of(found, step), progress.step) if hash_tensors else None
        values = None
        try:
            try:
                manifest = parse_manifest(raw, str(directory / MANIFEST))
                keep()  # the headers and the manifest live to the end (collector.py), the values child forks after
            except ManifestError as e:
                _cancel(hashing)
                rep.add("manifest", MANIFEST, str(e).removeprefix(f"{directory / MANIFEST}: "))
                check_config(directory, None, raw, rep)
                rep.findings += structure.findings
                return rep
            if numeric:
                check_base(Path(base), manifest)  # before the long checks: a wrong --base is a usage error
            values = Forked(lambda step: (value_findings(manifest, found),
                                          memory_report(manifest, found, parallel)), progress.step)
            check_structure(manifest, shards_read, structure)
            check_config(directory, manifest, raw, config)
            linears = manifest.linears()  # what the shared rules see, built once
            check_manifest(manifest, linears, manifest_findings)
            check_partitions(manifest, linears, tp_findings, parallel)
            digests = _digest_findings(manifest.tensors, found, hashing.result()) if hashing else []
            value_problems, rep.memory = values.result()
        except BaseException:
            _cancel(hashing, values)
            raise
        if not hashing:
            progress.step(len(found))  # (--fast: nothing hashed)
        rep.findings = (config.findings + structure.findings + digests + manifest_findings.findings + value_problems
                        + tp_findings.findings)
    broken = any(f.check in ("structure", "manifest") for f in rep.findings)
    if numeric:
        rep.checks.append("numeric")
        if broken:
            rep.add("numeric", str(directory), "skipped: the structure or the manifest is broken")
        else:
            from .fidelity import numeric_check

            rep.numeric = numeric_check(directory, manifest, found, Path(base), rep, thresholds or {}, text)
    if engine:
        tp, ep = parallel.tp, parallel.ep
        rep.checks.append(f"engine=sglang (tp=1{f', tp={tp}' if tp > 1 else ''}{f' ep={ep}' if ep > 1 else ''}, "
                          f"dtype={dtype})")
        if broken:
            rep.add("engine", str(directory), "skipped: the structure or the manifest is broken")
        else:
            from .engine import check_engine

            rep.engine = check_engine(directory, manifest, tp, dtype, rep, ep)
    return rep
