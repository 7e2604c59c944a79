"""Summaries of a converted directory, read from its manifest (never re-derived)."""
from __future__ import annotations

from pathlib import Path

from .manifest import describe_unit, load_manifest


def summarize(directory: Path) -> dict:
    m = load_manifest(directory)
    rows = []
    for name, mod in m["modules"].items():
        if mod["kind"] != "linear":
            continue
        rows.append({"name": name, "format": mod["format"], "source": mod["source"],
                     "bytes": sum(t_bytes(t) for s, t in mod["tensors"].items() if s != "bias")})
    t = m["totals"]
    other = t["bytes"] - t["linear_bytes"]
    bf16 = 2 * t["linear_weights"] + other
    return {"modules": rows, "by_format": t["by_format"], "bits_per_weight": t["bits_per_weight"],
            "bytes": t["bytes"], "bf16_bytes": bf16, "vs_bf16": t["bytes"] / bf16 if bf16 else 0.0,
            "units": {u: describe_unit(v) for u, v in m["units"].items()}}


def t_bytes(t: dict) -> int:
    from .safetensors_io import DTYPE_SIZE

    n = DTYPE_SIZE[t["dtype"]]
    for d in t["shape"]:
        n *= d
    return n
