"""The recipe: a typed, validated description of what to merge (YAML). Planning and execution live elsewhere.

    base: ./llama-bf16            # bf16 reference: config, tokenizer, unquantized tensors
    sources:                      # name → checkpoint dir (format detected from its config)
      fp8: ./llama-fp8
      gptq: ./llama-gptq-int4
    default: gptq                 # source for every linear no rule matches ("base" = keep bf16)
    rules:                        # ordered; first match wins; a rule that matches nothing is an error
      - match: "*.self_attn.*"    # glob on module names (also matches a suffix: "mlp.down_proj"), or "re:REGEX"
        layers: "0-1,7"           # optional layer filter
        source: fp8
      - match: lm_head
        source: base
      - match: "mlp.experts.*"    # expert-level mixed precision: some experts of a MoE layer in another format
        experts: "0-3"            # expert ids, or {file: routing.json, top: 8} / {file: …, coverage: 0.8}: the
        source: fp8               #   most routed experts of each layer, from a routing-frequency file
"""
from __future__ import annotations

import fnmatch
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import UserError, path_too_long
from .patterns import check_re_patterns

BASE = "base"


@lru_cache(maxsize=1024)  # planning asks every rule about every module: 214k questions in a DeepSeek-V3-sized job
def _name_tests(patterns: tuple[str, ...]) -> tuple:
    """A rule's `match` as compiled tests: a glob matches the whole name or a dotted tail of it ("self_attn.*" matches
    model.layers.0.self_attn.q_proj); "re:" is a regex searched anywhere in the name."""
    tests = []
    for p in patterns:
        if p.startswith("re:"):
            tests.append(re.compile(p[3:]).search)
        else:
            tests.append(re.compile(f"(?:{fnmatch.translate(p)})|(?:{fnmatch.translate('*.' + p)})").match)
    return tuple(tests)


_LAYER_PREFIX = re.compile(r"model\.layers\.\d+\.")


def literal_prefix(pattern: str) -> str | None:
    """What every name a glob pattern matches whole begins with — the pattern up to its first wildcard — when it
    begins `model.layers.N.` (digits and dots are literal in a glob); a name it matches by a dotted tail instead
    (_name_tests) holds that text after a dot. Lets planning look only at the modules it can match. None for a regex
    or any other glob."""
    if pattern.startswith("re:") or not _LAYER_PREFIX.match(pattern):
        return None
    return pattern[:min((i for i in map(pattern.find, "*?[") if i >= 0), default=len(pattern))]


MAX_ID = 65535  # beyond any model's layer or expert count; also bounds what a range may allocate


def parse_layers(spec: Union[str, int, list]) -> frozenset[int]:
    """"0-3,7" / 5 / [0, 1, "4-6"] → {0,1,2,3,7} …"""
    items = spec if isinstance(spec, list) else [spec]
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool) or len(str(item)) > 1000:
            raise ValueError(f"bad range {item!r}; use forms like 3, 0-5 or \"0-3,7\"")
        for part in str(item).split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
            if not m:
                raise ValueError(f"bad range {part!r}; use forms like 3, 0-5 or \"0-3,7\"")
            lo, hi = (int(m[1]), int(m[2])) if m[1] else (int(m[3]), int(m[3]))
            if hi < lo:
                raise ValueError(f"bad range {part!r}: {hi} < {lo}")
            if hi > MAX_ID:
                raise ValueError(f"bad range {part!r}: ids go up to {MAX_ID}")
            out.update(range(lo, hi + 1))
    if not out:  # `experts: []` reached planning as no experts at all (an internal error there)
        raise ValueError("names no ids; name some (3, 0-5, \"0-3,7\") or remove the key")
    return frozenset(out)


def format_ids(ids: list[int]) -> str:
    """The inverse of parse_layers on sorted ids: [0, 1, 2, 3, 7] → "0-3,7"."""
    out, start = [], None
    for i, e in enumerate(ids):
        if start is None:
            start = e
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            out.append(f"{start}" if start == e else f"{start}-{e}")
            start = None
    return ",".join(out)


def _path_can_exist(v: str, prefix: str = "") -> str:
    """A path in the recipe that no file can be at (too long) is refused where it is written."""
    why = path_too_long(v)
    if why:
        raise ValueError(f"{prefix}{why}; fix the path")
    return v


class ExpertsFromFile(BaseModel):
    """The most routed experts of each layer, from a routing-frequency file: JSON {"LAYER": [count per expert]} or
    SGLang's expert-distribution dump (a torch file whose `logical_count` is [..., layers, experts]). `top: N` takes
    each layer's N most routed experts; `coverage: F` the fewest that receive a fraction F of its routed tokens.
    Ties go to the lower expert id, so the choice is deterministic."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    file: str
    top: Union[int, None] = Field(None, ge=1)
    coverage: Union[float, None] = Field(None, gt=0, le=1)

    @field_validator("file")
    @classmethod
    def _file_can_exist(cls, v: str) -> str:
        return _path_can_exist(v)

    @model_validator(mode="after")
    def _one_criterion(self):
        if (self.top is None) == (self.coverage is None):
            raise ValueError("give exactly one of top (experts per layer) or coverage (fraction of routed tokens)")
        return self


# strict: YAML's types are taken as written — `experts: true` is not expert 1, `moe: "no"` is not false.
class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    match: Union[str, list[str]] = Field(description="glob on module names, or 're:REGEX'; a list matches any")
    source: str
    layers: Union[str, int, list[Union[str, int]], None] = None
    moe: Union[bool, None] = Field(None, description="true: only layers with a MoE block; false: only dense layers")
    experts: Union[str, int, list[Union[str, int]], ExpertsFromFile, None] = Field(
        None, description="only these routed experts (ids or ranges), or the most routed ones from a file")

    @field_validator("match")
    @classmethod
    def _patterns_ok(cls, v):
        patterns = [v] if isinstance(v, str) else v
        if not patterns:
            raise ValueError("names no patterns; give one (\"self_attn.*\") or a list of them")
        if not all(patterns):
            raise ValueError("empty pattern; give a glob (\"self_attn.*\") or \"re:REGEX\"")
        check_re_patterns(patterns)
        return v

    @field_validator("layers")
    @classmethod
    def _layers_ok(cls, v):
        if v is not None:
            parse_layers(v)
        return v

    @field_validator("experts", mode="before")
    @classmethod
    def _experts_file(cls, v):
        if not isinstance(v, dict):
            return v
        try:  # validated here so that the error names the file spec's problem, not every union member's
            return ExpertsFromFile.model_validate(v)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (use file with top or coverage)"
            raise ValueError(f"{where + ': ' if where else ''}{msg}") from None

    @field_validator("experts")
    @classmethod
    def _experts_ok(cls, v):
        if v is not None and not isinstance(v, ExpertsFromFile):
            parse_layers(v)
        return v

    @property
    def expert_ids(self) -> frozenset[int] | None:
        """Fixed expert ids; None when the rule has no expert filter or takes them from a file (see Recipe)."""
        return None if self.experts is None or isinstance(self.experts, ExpertsFromFile) else \
            parse_layers(self.experts)

    @property
    def layer_set(self) -> frozenset[int] | None:
        return None if self.layers is None else parse_layers(self.layers)

    @property
    def patterns(self) -> list[str]:
        return [self.match] if isinstance(self.match, str) else list(self.match)

    def name_tests(self) -> tuple:
        """The `match` patterns compiled: any of them passing selects the module (see _name_tests)."""
        return _name_tests(tuple(self.patterns))

    def matches_name(self, module: str) -> bool:
        return any(test(module) for test in self.name_tests())

    def describe(self, index: int) -> str:
        experts = self.experts.model_dump(exclude_none=True) if isinstance(self.experts, ExpertsFromFile) else \
            self.experts
        extra = (f" layers={self.layers}" if self.layers is not None else "") + (
            f" moe={self.moe}" if self.moe is not None else "") + (
            f" experts={experts}" if experts is not None else "")
        return f"rules[{index}] (match {self.match!r}{extra} → {self.source})"


class Output(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    shard_size: Union[str, int, None] = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    base: str
    sources: dict[str, str]
    default: str
    rules: list[Rule] = []
    # DeepSeek-V3's multi-token-prediction layers (SGLang's NextN speculative decoding): kept, built by the rules like
    # any layer, or left out of the output (config.json then says num_nextn_predict_layers: 0)
    mtp: Literal["keep", "drop"] = "keep"
    output: Output = Output()

    @field_validator("base")
    @classmethod
    def _base_can_exist(cls, v: str) -> str:
        return _path_can_exist(v)

    @field_validator("sources")
    @classmethod
    def _sources_can_exist(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            _path_can_exist(path, f"{name}: ")
        return v

    @model_validator(mode="after")
    def _names_ok(self):
        for name in self.sources:
            if not name or name.strip() != name or not name.isprintable():
                raise ValueError(f"sources: name {name!r} must be non-empty printable text without surrounding "
                                 f"spaces; rename it")
        if BASE in self.sources:
            raise ValueError(f"source name {BASE!r} is reserved for the base model; rename it")
        known = sorted(self.sources) + [BASE]
        if self.default not in known:
            raise ValueError(f"default: unknown source {self.default!r} (known: {', '.join(known)})")
        for i, r in enumerate(self.rules):
            if r.source not in known:
                raise ValueError(f"rules[{i}].source: unknown source {r.source!r} (known: {', '.join(known)})")
        return self

    # paths are relative to the recipe file
    _dir: Path = Path(".")
    _routing: dict = PrivateAttr(default_factory=dict)  # routing file → counts, read once per recipe
    _selected: dict = PrivateAttr(default_factory=dict)  # (rule index, layer) → its experts, chosen once

    def path_of(self, source: str) -> Path:
        return self._resolve(self.base if source == BASE else self.sources[source])

    def side_file_order(self) -> list[str]:
        """Where the side files (the tokenizer) are taken from, first to last: the base, the default source, the other
        sources by label. Build's output gets them so; plan and verify tokenize their text with the same."""
        return list(dict.fromkeys([BASE, self.default, *sorted(self.sources)]))

    def tokenizer_dirs(self) -> list[Path]:
        return [self.path_of(label) for label in self.side_file_order()]

    def _resolve(self, raw: str) -> Path:
        p = Path(raw).expanduser()
        return p if p.is_absolute() else (self._dir / p)

    def routed_experts(self, index: int, layer: int) -> frozenset[int] | None:
        """The experts rules[index] selects in this layer (None: no expert filter). Planning asks once per module;
        the answer is computed once per (rule, layer)."""
        rule = self.rules[index]
        fixed = not isinstance(rule.experts, ExpertsFromFile)  # the same in every layer
        key = (index, None if fixed else layer)
        selected = self.__pydantic_private__["_selected"]  # (pydantic's attribute lookup: ~3 µs a call, 44k calls)
        if key not in selected:
            selected[key] = rule.expert_ids if fixed else self._from_file(index, layer)
        return selected[key]

    def routing_counts(self, index: int) -> dict[int, tuple[float, ...]]:
        """rules[index]'s routing-frequency file: layer → routed tokens per expert (read once per file)."""
        path = self._resolve(self.rules[index].experts.file)
        if path not in self._routing:
            self._routing[path] = _routing_counts(path, f"rules[{index}].experts.file")
        return self._routing[path]

    def _from_file(self, index: int, layer: int) -> frozenset[int]:
        rule = self.rules[index]
        counts = self.routing_counts(index)
        if layer not in counts:
            raise UserError(f"rules[{index}].experts.file: {rule.experts.file} has no counts for layer {layer}; "
                            f"record routing over every MoE layer the rule's layers filter keeps")
        c = counts[layer]
        order = sorted(range(len(c)), key=lambda e: (-c[e], e))
        if rule.experts.top is not None:
            return frozenset(order[:rule.experts.top])
        total, acc, chosen = sum(c), 0.0, []
        if not total:
            raise UserError(f"rules[{index}].experts.file: {rule.experts.file} counts no routed tokens in layer "
                            f"{layer}, so coverage selects nothing; record routing on real traffic or use top")
        for e in order:
            if acc >= rule.experts.coverage * total:
                break
            chosen.append(e)
            acc += c[e]
        return frozenset(chosen)

    def routing_files(self) -> dict[str, str]:
        """sha256 of every routing-frequency file the rules read (recorded in the manifest: it decides formats)."""
        import hashlib

        return {r.experts.file: hashlib.sha256(self._resolve(r.experts.file).read_bytes()).hexdigest()
                for r in self.rules if isinstance(r.experts, ExpertsFromFile)}


class _LayerTwice(Exception):
    pass


def _each_layer_once(pairs: list) -> dict:
    """json.loads's hook for a routing file: a layer written twice — the same key (json keeps the last) or one
    number spelt two ways ("1" and "01") — is refused. (A key that is not a number fails later, with the file's
    format.)"""
    first: dict[int, str] = {}
    for k, _ in pairs:
        try:
            layer = int(k)
        except ValueError:
            continue
        if layer in first:
            raise _LayerTwice(layer if first[layer] == k else f"{layer} (as {first[layer]!r} and {k!r})")
        first[layer] = k
    return dict(pairs)


def _routing_counts(path: Path, where: str) -> dict[int, tuple[float, ...]]:
    """layer → routed-token count per expert. JSON {"0": [..], ...}, or SGLang's expert-distribution dump (a torch
    file with `logical_count`, [layers, experts] after summing any leading steps/ranks dimensions)."""
    try:
        if not path.exists():
            raise UserError(f"{where}: {path} not found; pass a routing-frequency file (JSON or SGLang's expert "
                            f"distribution dump)")
        if path.suffix == ".json":
            raw = json.loads(path.read_text(), object_pairs_hook=_each_layer_once)
            if not all(isinstance(v, list) and all(type(x) in (int, float) for x in v) for v in raw.values()):
                raise ValueError("every layer's counts must be a list of numbers")
            out = {int(k): tuple(float(x) for x in v) for k, v in raw.items()}
        else:
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            t = obj["logical_count"] if isinstance(obj, dict) else obj
            t = t.reshape(-1, *t.shape[-2:]).sum(0) if t.dim() > 2 else t
            out = {i: tuple(float(x) for x in row) for i, row in enumerate(t.tolist())}
    except _LayerTwice as e:
        raise UserError(f"{where}: {path} gives layer {e} twice; give each layer's counts once") from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{where}: cannot read routing counts from {path} ({e}); use JSON {{\"LAYER\": [count per "
                        f"expert, ...]}} or a torch file with logical_count [layers, experts]") from None
    if not all(0 <= x < float("inf") for v in out.values() for x in v):  # NaN fails both comparisons
        raise UserError(f"{where}: {path} has negative, NaN or infinite counts; counts are routed tokens per expert")
    return out


class _Misread(yaml.MarkedYAMLError):
    """YAML that a reader would take other than as written (problem: the whole message; problem_mark: where)."""


_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_YAML11_BOOLEANS = {"yes", "no", "on", "off"}  # (any case) YAML 1.1 booleans; YAML 1.2 and most people read text


class _RecipeLoader(yaml.SafeLoader):
    """YAML as yaml.safe_load reads it, refusing what it would read other than the writer meant — silently, each one:
    a key written twice in one mapping (the spec forbids it; PyYAML keeps the last: `sources: {g: ./gptq, g: ./int8}`
    built every module in Int8); YAML 1.1's other spellings of numbers (`layers: 010` is octal, layer 8; `0x1A`, `1_0`,
    `1:20` — base 60, 80 —), and its yes/no/on/off booleans (a source named `on` is true). Keys a merge
    (`<<: *defaults`) brings in may be overridden: that is what a merge is for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor below says so
                if first is not key_node:
                    raise _Misread(problem=f"{key!r} is written twice in one mapping (first on line "
                                           f"{first.start_mark.line + 1}), and YAML would keep only the last; "
                                           f"remove one", problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        if not _DECIMAL.fullmatch(node.value):
            raise self._number(node, value)
        return value

    def construct_yaml_float(self, node):
        value = super().construct_yaml_float(node)
        if "_" in node.value or ":" in node.value:
            raise self._number(node, value)
        return value

    @staticmethod
    def _number(node, value) -> _Misread:
        text = node.value.lstrip("+-").lower()
        how = "base 60" if ":" in text else "hexadecimal" if text.startswith("0x") else "binary" if \
            text.startswith("0b") else "its _ ignored" if "_" in text else "octal"
        return _Misread(problem=f"{node.value} is the number {value} in YAML 1.1 ({how}); write numbers in plain "
                                f"decimal, or quote it as text", problem_mark=node.start_mark)

    def construct_yaml_bool(self, node):
        value = super().construct_yaml_bool(node)
        if node.value.lower() in _YAML11_BOOLEANS:
            raise _Misread(problem=f"{node.value} is the boolean {str(value).lower()} in YAML 1.1; quote it "
                                   f"('{node.value}') for the text, or write true or false",
                           problem_mark=node.start_mark)
        return value


for _tag, _construct in (("int", _RecipeLoader.construct_yaml_int), ("float", _RecipeLoader.construct_yaml_float),
                         ("bool", _RecipeLoader.construct_yaml_bool)):
    _RecipeLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _construct)


def load_recipe(path: Path, sources_only: bool = False) -> Recipe:
    """The recipe at `path`, validated. sources_only: a sources file for `mpconvert plan` (a recipe without rules:
    base and sources; default, when given, is ignored — plan writes the rules)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)
    except _Misread as e:
        raise UserError(f"{path}: line {e.problem_mark.line + 1}: {e.problem}") from None
    except FileNotFoundError:
        raise UserError(f"{path}: recipe not found; pass the path of a recipe YAML (see `mpconvert build --help`)") \
            from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; pass the path of a recipe YAML file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    _check_written_out(data, path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping with keys base, sources, default, rules")
    if sources_only:
        if data.get("rules"):
            raise UserError(f"{path}: a sources file has no rules (plan writes them); remove `rules`")
        data = {**data, "default": BASE, "rules": []}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{path}: {_first_problem(e)}") from None
    recipe._dir = path.resolve().parent
    return recipe


MAX_RECIPE_VALUES = 1_000_000  # a recipe listing every expert of every layer of DeepSeek-V3 one by one: ~16k


class _SelfReference(Exception):
    pass


def _check_written_out(data, path: Path) -> None:
    """A recipe as YAML aliases write it out (`*name` is the value `&name` marks, shared, not copied): an alias of an
    alias of … is a few lines and billions of values — a build that validated it ran for minutes and took 8 GB
    before it was stopped — and an alias inside its own value never ends. Counted once per shared value."""
    counted: dict[int, int] = {}

    def values(x, open_: set) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        if id(x) in counted:
            return counted[id(x)]
        if id(x) in open_:
            raise _SelfReference
        open_.add(id(x))
        n = 1 + sum(values(v, open_) for v in (x if isinstance(x, list) else [*x.keys(), *x.values()]))
        open_.discard(id(x))
        counted[id(x)] = n
        return n

    try:
        n = values(data, set())
    except _SelfReference:
        raise UserError(f"{path}: a YAML alias (*name) inside the value it names never ends; write the value out")
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe") from None
    if n > MAX_RECIPE_VALUES:
        raise UserError(f"{path}: with its YAML aliases (*name) written out, the recipe has {n:,} values (more than "
                        f"{MAX_RECIPE_VALUES:,}); a recipe is a few rules — write them without nesting aliases")


def _shown(value) -> str:
    """A recipe value in an error, as JSON — but nothing as YAML spells it: `base:` with no value, `~` and `null`
    all read as null (a `~` meant as the home directory is `~/…`)."""
    return "an empty value (YAML reads `key:`, `~` and `null` alike)" if value is None else \
        json.dumps(value, default=str)


def _is_union_tag(x) -> bool:
    """pydantic names the member of a Union that failed in the error's location (…layers.str, …layers.int)."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x)


_EXPECTED = {"str": "text", "int": "an integer", "float": "a number", "bool": "true or false", "list": "a list",
             "dict": "a mapping", "model": "a mapping"}


def _first_problem(e: ValidationError) -> str:
    """The recipe's first problem as `where: what`. A value no member of a Union accepts (`layers: true`) is one
    message naming what the key takes, not pydantic's first member's complaint (`layers.str: …valid string`)."""
    errors = e.errors()
    err = errors[0]
    where = tuple(x for x in err["loc"] if not _is_union_tag(x))
    loc = ".".join(str(x) for x in where) or "recipe"
    tags = [x["loc"][len(where)] for x in errors if len(x["loc"]) > len(where)
            and tuple(x["loc"][:len(where)]) == where and _is_union_tag(x["loc"][len(where)])]
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key; allowed keys are documented in `mpconvert build --help`"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    if len(tags) > 1 or (tags and err["type"].endswith("_type")):
        kinds = list(dict.fromkeys(_EXPECTED.get(t.split("[")[0], "a mapping") for t in tags))
        kinds = [k + " of those" if k == "a list" and kinds[0] != k else k for k in kinds]
        return f"{loc}: {_shown(err['input'])} is not allowed here; give " \
               f"{', '.join(kinds[:-1]) + ' or ' if len(kinds) > 1 else ''}{kinds[-1]}"
    if err["type"].endswith("_type"):
        kind = _EXPECTED.get(err["type"].removesuffix("_type").replace("string", "str"))
        if kind:
            return f"{loc}: {_shown(err['input'])} is not allowed here; give {kind}"
    return f"{loc}: {err['msg'].removeprefix('Value error, ')}"


MAX_SHARD = 2**50  # 1 PiB: a bound, not a limit anyone meets


def parse_size(v: Union[str, int]) -> int:
    """'5GB' / '500MiB' / 1000000 → bytes (decimal units as Hugging Face uses them; *iB binary)."""
    from decimal import Decimal

    if isinstance(v, bool):
        raise UserError(f"bad size {v!r}; use forms like 5GB, 500MB, 2GiB")
    if isinstance(v, int):
        n = v
    else:
        m = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([KMGT]?i?B?)\s*", v, re.I)
        if not m:
            raise UserError(f"bad size {v!r}; use forms like 5GB, 500MB, 2GiB")
        unit = m[2].upper().rstrip("B")
        mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}.get(unit)
        if mult is None:
            raise UserError(f"bad size {v!r}; use forms like 5GB, 500MB, 2GiB")
        n = int(Decimal(m[1]) * mult)
    if n <= 0:
        raise UserError(f"bad size {v!r}: must be positive")
    if n > MAX_SHARD:
        raise UserError(f"bad size {v!r}: larger than 1 PiB; shards are usually 5GB")
    return n
