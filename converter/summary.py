"""Summaries of a converted directory, read from its manifest (never re-derived)."""
from __future__ import annotations

import re
from pathlib import Path

from .manifest import as_json, load_manifest
from .recipe import format_ids

_RULE_INDEX = re.compile(r"rules\[(\d+)\]")


def summarize(directory: Path, modules: bool = True) -> dict:
    """modules: also list every linear module (the rest is read from the manifest's totals and units)."""
    m, _ = load_manifest(directory)
    rows = [{"name": name, "format": mod.format, "source": mod.source, "bytes": mod.weight_bytes()}
            for name, mod in m.modules.items() if mod.kind == "linear"] if modules else []
    t = m.totals
    other = t.bytes - t.linear_bytes
    bf16 = 2 * t.linear_weights + other
    return {"modules": rows, "by_format": {k: as_json(v) for k, v in t.by_format.items()},
            "bits_per_weight": t.bits_per_weight, "bytes": t.bytes, "bf16_bytes": bf16,
            "vs_bf16": t.bytes / bf16 if bf16 else 0.0, "units": {u: v.describe() for u, v in m.units.items()},
            "layout": m.layout, "rules": by_rule(m.modules)}


def by_rule(modules: dict) -> list[dict]:
    """What each recipe rule (and the default) chose, from the manifest's chosen_by: its linear modules, their source
    and formats, and the layers they lie in — so that a pattern matching more than its writer meant shows at once
    (`model.layers.1*` is layers 1 and 10-19). In the recipe's order, the default after the rules; what coupling
    chose (a folded-scale source's partner) after them."""
    groups: dict[str, dict] = {}
    for m in modules.values():
        if m.kind != "linear":
            continue
        g = groups.get(m.chosen_by)
        if g is None:
            g = groups[m.chosen_by] = {"chosen_by": m.chosen_by, "source": m.source, "formats": set(), "modules": 0,
                                       "layers": set()}
        g["modules"] += 1
        g["formats"].add(m.format)
        if m.layer is not None:
            g["layers"].add(m.layer)

    def order(g: dict):
        rule = _RULE_INDEX.match(g["chosen_by"])
        return (0, int(rule[1]), "") if rule else (1, 0, "") if g["chosen_by"].startswith("default") else \
            (2, 0, g["chosen_by"])

    return [{**g, "formats": sorted(g["formats"]), "layers": format_ids(sorted(g["layers"]))}
            for g in sorted(groups.values(), key=order)]


def rule_lines(rules: list[dict], limit: int = 20) -> list[str]:
    """by_rule as lines for a terminal: the first `limit` rules, how many more (a per-expert recipe has a rule per
    layer and expert range: 976 for DeepSeek-V3), then the default and what coupling chose."""
    def line(g: dict) -> str:
        n, layers = g["modules"], g["layers"]
        where = f" in layer{'s' if '-' in layers or ',' in layers else ''} {layers}" if layers else ""
        return f"{g['chosen_by']}: {n:,} linear module{'s' if n > 1 else ''}{where} ({'/'.join(g['formats'])})"

    by_rules = [g for g in rules if _RULE_INDEX.match(g["chosen_by"])]
    rest = [g for g in rules if not _RULE_INDEX.match(g["chosen_by"])]
    more = [f"… and {len(by_rules) - limit:,} more rules (--json lists them all)"] if len(by_rules) > limit else []
    return [line(g) for g in by_rules[:limit]] + more + [line(g) for g in rest]
