"""Summaries of a converted directory, read from its manifest (never re-derived)."""
from __future__ import annotations

from pathlib import Path

from .manifest import as_json, load_manifest


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
            "layout": m.layout}
