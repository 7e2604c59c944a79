"""`mpconvert plan`, the choosing half: which source serves each unit, under a byte budget, from measured costs.

The decisions are SGLang's fused units (qkv, o, gate_up, down, a MoE layer's experts — or each expert where the
layer may mix), because a unit runs one kernel and so takes one source. Units that a folded-scale source couples
(AWQ moves o_proj's input scale into v_proj and down_proj's into up_proj, and the norm's into q/k/v and gate/up) form
one *group*: a folded-scale source serves the whole group or none of it. Every other source serves each unit of a
group on its own. Which source may serve a unit at all is asked of the shared rules (rules.py: one scheme per unit,
TP/EP partitions, the native kernel's shapes), the same rules build enforces — so a plan always builds.

The solver minimises the predicted KL (the sum of the measured per-option costs: the KL of swapping only that unit
to that source, sensitivity.py) under the budget: per group the options' lower convex hull of (bytes, KL), then
greedy upgrades by KL saved per extra byte — the Lagrangian relaxation of the multiple-choice knapsack, optimal at
the budgets it stops on exactly and deterministic (ties go to the group's natural order). No torch here.
"""
from __future__ import annotations

import heapq
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import rules
from .errors import UserError
from .formats import FORMATS
from .layout import ModelInfo, Role, natural_key, stage_norms
from .plan import Inputs, bias_mismatch, unchanged_norm, written_nbytes, written_scheme
from .recipe import BASE, Recipe, format_ids

BF16_BYTES = 2


@dataclass(frozen=True)
class UnitSource:
    """One unit served by one source: its members' modules, their bytes, whether the source folds scales."""
    unit: str
    source: str
    modules: tuple[str, ...]
    nbytes: int
    scheme: str  # describe() of its scheme, for reports
    folds: bool
    format: str = "unquantized"


@dataclass(frozen=True)
class Option:
    """One way to serve a group: (unit, source) for each of its units; bytes; predicted ΔKL."""
    picks: tuple[tuple[str, str], ...]
    nbytes: int
    kl: float


@dataclass
class Group:
    name: str
    units: tuple[str, ...]
    options: list[Option] = field(default_factory=list)


@dataclass
class Candidates:
    """Every unit and the sources that can serve it (after the build rules), the groups, and what no choice
    changes (embeddings, norms, routers, units only the base serves)."""
    info: ModelInfo
    units: dict[str, list[UnitSource]]  # unit → its servers, the base's bf16 first
    groups: list[tuple[str, tuple[str, ...]]]  # (group name, its units)
    fixed_bytes: int  # everything but the linears
    linear_weights: int
    # the base's multi-token-prediction layers, left out: they serve speculative decoding only, and next-token KL
    # (what plan measures) cannot see them — the recipe says `mtp: drop`
    mtp_layers: tuple[int, ...] = ()


def _linears(inputs: Inputs, roles: dict[str, Role], label: str, names: list[str]) -> list[rules.Linear] | None:
    src = inputs.sources[label]
    out = []
    for n in names:
        view = src.modules.get(n)
        if view is None or bias_mismatch(inputs.base.modules[n].tensors, view.tensors):
            return None
        out_f, in_f = inputs.base.modules[n].tensors["weight"].shape
        out.append(rules.Linear(n, roles[n], written_scheme(view.scheme, inputs.info.model_type), label, "plan",
                                out_f, in_f))
    return out


def candidates(inputs: Inputs, parallel: rules.Parallel = rules.Parallel(), per_expert: bool = True) -> Candidates:
    """Which sources may serve each unit. A source serves a unit when it has all its modules in one quantized scheme
    that builds at these sizes (rules.unit_problems / mla_problems / partition_problems) and in a model dtype the
    experts' servers leave open (one_dtype); the base always serves (bf16). per_expert: each routed expert is a unit
    of its own (a MoE layer may mix formats per expert), else a MoE layer's experts are one unit."""
    # heads, expert counts: no source helps
    model_level = rules.partition_problems([], inputs.info, parallel)
    if model_level:
        raise UserError(model_level[0].message)
    roles = inputs.roles(mtp="drop")
    by_unit: dict[str, list[str]] = {}
    fixed = weights = 0
    for name, role in roles.items():
        tensors = inputs.base.modules[name].tensors
        if role.kind != "linear":
            fixed += sum(t.nbytes for t in tensors.values())
            continue
        unit = role.unit if role.expert is None or not per_expert else f"{role.unit}.{role.expert}"
        by_unit.setdefault(unit, []).append(name)
        out_f, in_f = tensors["weight"].shape
        weights += out_f * in_f
    units: dict[str, list[UnitSource]] = {}
    norm_of, changed = stage_norms(inputs.base.modules), {}
    for unit, names in by_unit.items():
        base_bytes = sum(t.nbytes for n in names for t in inputs.base.modules[n].tensors.values())
        servers = [UnitSource(unit, BASE, tuple(names), base_bytes, "bf16", False)]
        for label in sorted(inputs.sources):
            if label == BASE:
                continue
            members = _linears(inputs, roles, label, names)
            if members is None or any(m.scheme.format == "unquantized" for m in members):
                continue
            if rules.unit_problems(unit, members) or rules.mla_problems(members, inputs.info.model_type) or \
                    rules.partition_problems(members, inputs.info, parallel):
                continue
            fmt = FORMATS[members[0].scheme.format]
            folds = fmt.folds(members[0].scheme.params) or _changes_norm(inputs, label, names, roles, norm_of,
                                                                           changed)
            if (folds or fmt.expert_group_problem) and members[0].role.expert is not None and per_expert:
                # its norm feeds every expert of the layer, or its experts cannot be one format group among others:
                # it may serve a whole layer only (rules.py) — the per-layer recipe plan also weighs (joint check)
                continue
            nbytes = sum(written_nbytes(inputs.sources[label].modules[m.name], m.out_features, m.in_features)
                         for m in members)
            servers.append(UnitSource(unit, label, tuple(names), nbytes, members[0].scheme.describe(), folds,
                                      members[0].scheme.format))
        units[unit] = servers  # only the base: a group with one option
    one_dtype(units, roles, inputs.info.model_type)
    mtp = tuple(sorted({inputs.info.mtp_layer_of(n) for n in inputs.base.modules if n not in roles}))
    return Candidates(inputs.info, units, _groups(units, roles, norm_of), fixed, weights, mtp)


def _changes_norm(inputs: Inputs, label: str, names: list[str], roles: dict[str, Role], norm_of: dict,
                  changed: dict) -> bool:
    """Whether source `label` holds other values than the base for a norm these modules read: a fold no format
    records (SmoothQuant's, in a W8A8 source), which ties the source's modules to that norm as AWQ's are. `changed`
    keeps each (source, norm) answer: a MoE layer's experts, each a unit of its own, read one norm."""
    src = inputs.sources[label]
    for n in {norm_of.get((roles[m].layer, roles[m].stage)) for m in names} - {None}:
        if n in src.modules and (label, n) not in changed:
            changed[(label, n)] = not unchanged_norm(src.modules[n].tensors["weight"],
                                                     inputs.base.modules[n].tensors["weight"], inputs.info.model_type)
        if changed.get((label, n)):
            return True
    return False


def one_dtype(units: dict[str, list[UnitSource]], roles: dict[str, Role], model_type: str) -> None:
    """Plan weighs each unit's servers on their own, but a model runs in one dtype (rules.dtype_problems: GPTQ MoE
    experts in float16 only, a DeepSeek kv_b_proj absorbed from FP8 or Int8 in bfloat16 only). The routed experts,
    most of a MoE model's bytes, keep every server; another unit loses a server that shares no dtype with some
    expert server (a DeepSeek kv_b_proj then stays bf16 where GPTQ experts are on offer: ~0.3 % of DeepSeek-V3's
    bytes), so that no choice among the rest can make a recipe build refuses."""
    def dtypes(s: UnitSource) -> set[str]:
        return set(rules.model_dtypes(roles[s.modules[0]].unit, s.format, model_type,
                                      roles[s.modules[0]].expert is not None))

    expert_needs = [d for servers in units.values() for s in servers if roles[s.modules[0]].expert is not None
                    for d in [dtypes(s)] if d]
    for unit, servers in units.items():
        if roles[servers[0].modules[0]].expert is None:
            units[unit] = [s for s in servers if not (d := dtypes(s)) or all(d & need for need in expert_needs)]


def _groups(units: dict[str, list[UnitSource]], roles: dict[str, Role], norm_of: dict
            ) -> list[tuple[str, tuple[str, ...]]]:
    """Units joined where a folded-scale source could serve them (v→o, up→down share a fold; the units reading one
    norm share its fold: a parallel block's attention and MLP, a MoE layer's experts and shared experts), each other
    unit alone. Only units some folding source serves are joined."""
    links: dict[str, list[str]] = {}
    for unit, servers in units.items():
        if any(s.folds for s in servers):
            keys = set()
            for name in servers[0].modules:
                role = roles[name]
                if role.pair:
                    keys.add(role.pair[0])
                if (role.layer, role.stage) in norm_of:
                    keys.add(norm_of[(role.layer, role.stage)])
            for key in keys:
                links.setdefault(key, []).append(unit)
    parent = {u: u for u in units}

    def find(u):
        while parent[u] != u:
            u = parent[u]
        return u

    for members in links.values():
        for u in members[1:]:
            parent[find(u)] = find(members[0])
    groups: dict[str, list[str]] = {}
    for u in sorted(units, key=natural_key):
        groups.setdefault(find(u), []).append(u)
    return sorted(((g[0] if len(g) == 1 else g[0] + "+" + ",".join(x.rsplit(".", 1)[-1] for x in g[1:]), tuple(g))
                   for g in groups.values()), key=lambda x: natural_key(x[1][0]))


def _folded_sources(c: Candidates, group: tuple[str, ...]) -> list[str]:
    """The folded-scale sources that serve every unit of a group (the only way such a source may serve it)."""
    folding = {s.source for u in group for s in c.units[u] if s.folds}
    return sorted(label for label in folding if all(any(s.source == label for s in c.units[u]) for u in group))


def measurements_needed(c: Candidates) -> list[tuple[str, ...]]:
    """What sensitivity.py must measure, as (source, unit, unit, …): each non-folding (unit, source) alone, and a
    folded-scale source over its whole group (the norm it changed goes with it). Units only the base serves, and the
    base itself, cost nothing."""
    out = []
    for _, group in c.groups:
        for unit in group:
            for s in c.units[unit][1:]:
                if not s.folds:
                    out.append((s.source, unit))
        out += [(label, *group) for label in _folded_sources(c, group)]
    return out


def options(c: Candidates, cost: dict[tuple[str, ...], float]) -> list[Group]:
    """Each group's ways to be served: every combination of non-folding servers per unit (costs add), and each
    folded-scale source over the whole group (its joint cost)."""
    out = []
    for name, group in c.groups:
        g = Group(name, group)
        per_unit = [[s for s in c.units[u] if not s.folds] for u in group]
        for combo in itertools.product(*per_unit):
            kl = sum(0.0 if s.source == BASE else cost[(s.source, s.unit)] for s in combo)
            g.options.append(Option(tuple((s.unit, s.source) for s in combo), sum(s.nbytes for s in combo), kl))
        for label in _folded_sources(c, group):
            nbytes = sum(next(s.nbytes for s in c.units[u] if s.source == label) for u in group)
            g.options.append(Option(tuple((u, label) for u in group), nbytes, cost[(label, *group)]))
        out.append(g)
    return out


def unit_cost(costs: dict[tuple[str, ...], float], label: str, unit: str) -> float:
    """What serving `unit` from `label` costs: its own measurement, or its share of the group measurement a
    folded-scale source has (split evenly over the group's units, for reports)."""
    if label == BASE:
        return 0.0
    if (label, unit) in costs:
        return costs[(label, unit)]
    for key, kl in costs.items():
        if key[0] == label and unit in key[1:]:
            return kl / (len(key) - 1)
    return 0.0


def _hull(opts: list[Option]) -> list[Option]:
    """The options worth taking in order of bytes: cheapest first, each later one with lower KL, on the lower convex
    hull (a point above the hull is never the greedy's best step)."""
    pts = sorted(opts, key=lambda o: (o.nbytes, o.kl, o.picks))
    frontier: list[Option] = []
    for o in pts:
        if frontier and o.kl >= frontier[-1].kl:
            continue
        while len(frontier) >= 2:
            a, b = frontier[-2], frontier[-1]
            # b is above the segment a→o: drop it
            if (b.kl - a.kl) * (o.nbytes - a.nbytes) >= (o.kl - a.kl) * (b.nbytes - a.nbytes):
                frontier.pop()
            else:
                break
        frontier.append(o)
    return frontier


@dataclass
class Solution:
    choice: dict[str, Option]  # group name → option
    nbytes: int  # the whole model
    kl: float  # predicted
    path: list[tuple[int, float]]  # (bytes, predicted KL) after each greedy step: the frontier


def solve(groups: list[Group], fixed_bytes: int, budget: int) -> Solution:
    """Cheapest option everywhere, then the upgrade saving the most KL per extra byte, while it fits."""
    hulls = {g.name: _hull(g.options) for g in groups}
    at = {name: 0 for name in hulls}
    nbytes = fixed_bytes + sum(h[0].nbytes for h in hulls.values())
    if nbytes > budget:
        raise UserError(f"--budget {budget:,} bytes is below the smallest model these sources make ({nbytes:,} "
                        f"bytes, every unit in its smallest format); raise the budget or add a smaller source")
    kl = sum(h[0].kl for h in hulls.values())
    order = {g.name: i for i, g in enumerate(groups)}
    heap: list = []

    def push(name):
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            step_bytes = h[i + 1].nbytes - h[i].nbytes
            saved = h[i].kl - h[i + 1].kl
            heapq.heappush(heap, (-saved / max(step_bytes, 1), order[name], name))

    for name in hulls:
        push(name)
    path = [(nbytes, kl)]
    while heap:
        _, _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        extra = h[i + 1].nbytes - h[i].nbytes
        if nbytes + extra > budget:
            continue  # this group stays where it is; smaller steps of others may still fit
        nbytes += extra
        kl += h[i + 1].kl - h[i].kl
        at[name] = i + 1
        path.append((nbytes, kl))
        push(name)
    return Solution({name: hulls[name][i] for name, i in at.items()}, nbytes, max(kl, 0.0), path)


def frontier(groups: list[Group], fixed_bytes: int) -> list[tuple[int, float]]:
    """The predicted KL-vs-bytes curve from the smallest model to the most precise one (the greedy path with no
    budget)."""
    return solve(groups, fixed_bytes, 1 << 62).path


def uniform_points(c: Candidates, cost: dict[tuple[str, ...], float]) -> dict[str, tuple[int, float]]:
    """Each source alone (where it serves every unit it can, the base the rest): its bytes and predicted KL — the
    single-format builds the plan must beat."""
    out = {}
    labels = sorted({s.source for servers in c.units.values() for s in servers[1:]})
    for label in labels:
        nbytes, kl = c.fixed_bytes, 0.0
        for _, group in c.groups:
            servers = {u: {s.source: s for s in c.units[u]} for u in group}
            if label in _folded_sources(c, group):
                nbytes += sum(servers[u][label].nbytes for u in group)
                kl += cost[(label, *group)]
                continue
            for u in group:
                s = servers[u].get(label)
                if s is None or s.folds:  # a folded-scale source serves its whole group or nothing
                    s = servers[u][BASE]
                nbytes += s.nbytes
                kl += 0.0 if s.source == BASE else cost[(s.source, u)]
        out[label] = (nbytes, kl)
    return out


# ---- budget ------------------------------------------------------------------------------------------------------
def parse_budget(spec: str, c: Candidates) -> int:
    """--budget: bytes ('3.5GB', '120MB', 1000000), bits per weight over the linears ('5.5bpw'), or a fraction of the
    bf16 model ('0.4x'). Returns bytes of the whole model."""
    from .recipe import parse_size

    s = spec.strip().lower()
    bf16 = c.fixed_bytes + sum(servers[0].nbytes for servers in c.units.values())
    try:
        if s.endswith("bpw") or s.endswith("x"):
            value = float(s[:-3] if s.endswith("bpw") else s[:-1])
            n = int(c.fixed_bytes + value * c.linear_weights / 8) if s.endswith("bpw") else int(value * bf16)
        else:
            value = n = int(s) if s.lstrip("-").isdigit() else parse_size(spec)
    except (ValueError, OverflowError, UserError):  # parse_size's own message speaks of shard sizes
        raise UserError(f"--budget {spec!r}: use bytes (3.5GB, 120MB), bits per weight (5.5bpw) or a fraction of "
                        f"bf16 (0.4x)") from None
    if not value > 0:
        raise UserError(f"--budget {spec!r} is not positive")
    smallest = c.fixed_bytes + sum(min(s.nbytes for s in servers) for servers in c.units.values())
    if n < smallest:
        raise UserError(f"--budget {spec!r} ({n:,} bytes) is below the smallest model these sources make "
                        f"({smallest:,} bytes: every unit in its smallest format, {smallest / bf16:.3f}x bf16); raise "
                        f"the budget or add a smaller source")
    if n > bf16:
        raise UserError(f"--budget {spec!r} ({n:,} bytes) is above the bf16 model ({bf16:,} bytes): nothing to "
                        f"choose — serve the base, or lower the budget")
    return n


# ---- the recipe ---------------------------------------------------------------------------------------------------
def _unit_key(unit: str, modules: tuple[str, ...], roles: dict[str, Role]) -> tuple[tuple[str, ...], int | None,
                                                                                   int | None]:
    """(module patterns without the layer prefix, layer, expert) of one unit: what a recipe rule matches."""
    role = roles[modules[0]]
    experts = {roles[m].expert for m in modules}
    expert = role.expert if len(experts) == 1 else None  # a whole MoE layer's experts: no expert filter
    prefix = f"layers.{role.layer}." if role.layer is not None else ""
    pats = []
    for m in modules:
        r = roles[m]
        tail = m.split(prefix, 1)[1] if prefix and prefix in m else m
        if r.expert is not None:
            tail = tail.replace(f"experts.{r.expert}.", "experts.*.")
        pats.append(tail)
    return tuple(sorted(set(pats))), role.layer, expert


def recipe_yaml(recipe: Recipe, sources_file: Path, out: Path, c: Candidates, sol: Solution,
                costs: dict[tuple[str, ...], float], roles: dict[str, Role], header: list[str]) -> str:
    """A normal recipe (build takes it unchanged): default base, one rule per (unit kind, source) with its layers
    (and experts), each commented with its bytes and predicted ΔKL."""
    picks: dict[str, str] = {}
    for opt in sol.choice.values():
        picks.update(dict(opt.picks))
    rows: dict[tuple, dict] = {}
    for unit, label in sorted(picks.items(), key=lambda x: natural_key(x[0])):
        if label == BASE:
            continue
        server = next(s for s in c.units[unit] if s.source == label)
        pats, layer, expert = _unit_key(unit, server.modules, roles)
        key = (pats, label, expert is not None, layer if expert is not None else None)
        row = rows.setdefault(key, {"layers": [], "experts": [], "bytes": 0, "kl": 0.0})
        if expert is not None:
            row["experts"].append(expert)
            row["layers"] = [layer]
        elif layer is not None:
            row["layers"].append(layer)
        row["bytes"] += server.nbytes
        row["kl"] += unit_cost(costs, label, unit)

    def rel(p: str) -> str:
        """An absolute path as the user wrote it; a relative one re-based from the sources file to the recipe."""
        q = Path(p).expanduser()
        if q.is_absolute():
            return p
        return os.path.relpath((sources_file.resolve().parent / q).resolve(), out.resolve().parent)

    lines = [f"# {h}" for h in header]
    lines += [f"base: {_q(rel(recipe.base))}", "sources:"]
    lines += [f"  {_q(k)}: {_q(rel(v))}" for k, v in sorted(recipe.sources.items())]
    lines += ["default: base   # every unit no rule names stays bf16"]
    if c.mtp_layers:
        lines += [f"mtp: drop   # MTP layer {format_ids(list(c.mtp_layers))}: speculative decoding only, which "
                  f"next-token KL cannot measure; keep it with rules of your own"]
    lines += ["rules:"]
    if not rows:
        lines[-1] = "rules: []"
    for (pats, label, is_expert, _), row in sorted(rows.items(), key=lambda x: (natural_key(x[0][0][0]), x[0][1])):
        match = _q(pats[0]) if len(pats) == 1 else "[" + ", ".join(_q(p) for p in pats) + "]"
        lines.append(f"  - match: {match}   # {row['bytes'] / 1e6:.2f} MB, predicted ΔKL {row['kl']:.5f}")
        if row["layers"]:
            lines.append(f"    layers: {_q(format_ids(sorted(row['layers'])))}")
        if is_expert:
            lines.append(f"    experts: {_q(format_ids(sorted(row['experts'])))}")
        lines.append(f"    source: {_q(label)}")
    return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar, quoted and escaped
