"""Real fixtures on demand: tiny random models quantized by the real producers, cached by content hash.

The producers (llm-compressor, gptqmodel) live in their own venv (.venv-fixtures, made by `make setup`) because they
need a newer transformers than SGLang 0.5.17 accepts; producers.py runs there as a subprocess. Outputs are cached
outside the clone under $MPCONVERT_CACHE (default ~/.cache/mpconvert) keyed by the hash of producers.py, the
fixture kind and the base's key — so CI regenerates them only when the recipe for making them changes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .errors import UserError

HERE = Path(__file__).resolve().parent
PRODUCERS = HERE / "producers.py"


def cache_root() -> Path:
    return Path(os.environ.get("MPCONVERT_CACHE", Path.home() / ".cache" / "mpconvert")) / "fixtures"


def fixture_python() -> Path:
    env = os.environ.get("MPCONVERT_FIXTURE_PYTHON")
    p = Path(env) if env else HERE.parent / ".venv-fixtures" / "bin" / "python"
    if not p.exists():
        raise UserError(f"{p}: the fixture producers' venv is missing; run `make setup` (or set "
                        f"MPCONVERT_FIXTURE_PYTHON to a python with llm-compressor and gptqmodel)")
    return p


def _key(kind: str, base_key: str) -> str:
    h = hashlib.sha256(PRODUCERS.read_bytes())
    h.update(f"\0{kind}\0{base_key}".encode())
    return h.hexdigest()[:16]


def fixture(arch: str, kind: str = "base", log=None) -> Path:
    """Path of a cached fixture: `base` (bf16) or a quantized KIND (see producers.py) of the `arch` base."""
    base_key = _key(f"base-{arch}", "")
    key = base_key if kind == "base" else _key(kind, base_key)
    out = cache_root() / f"{arch}-{kind}-{key}"
    if (out / "config.json").exists():
        return out
    base = None if kind == "base" else fixture(arch, "base", log)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log.print(f"making fixture {arch}/{kind} with the real producer (cached in {out.parent}) …")
    args = [str(fixture_python()), "-P", str(PRODUCERS), f"base-{arch}" if kind == "base" else kind, str(tmp)]
    if base:
        args.append(str(base))
    env = dict(os.environ, TMPDIR=os.environ.get("TMPDIR", "/tmp"), GPTQMODEL_CPU_WORKERS="2",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    scratch = cache_root().parent / "producer-scratch"  # gptqmodel writes logs/ into its cwd: not the user's
    scratch.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=scratch)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])
        raise UserError(f"producer {kind} for {arch} failed (exit {p.returncode}): {tail}")
    try:
        tmp.rename(out)
    except OSError:  # another process made the same fixture meanwhile: identical inputs, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


DEMO_RECIPE = """\
# mpconvert demo: a tiny Llama, three real quantized checkpoints of it, one mixed result.
base: {base}
sources:
  fp8: {fp8}      # llm-compressor FP8 (per-tensor, static activations)
  int8: {int8}    # llm-compressor W8A8 int8
  gptq: {gptq}    # gptqmodel GPTQ int4 g128
default: gptq      # the bulk in int4
rules:
  - match: "self_attn.*"     # attention of the first layer in FP8
    layers: 0
    source: fp8
  - match: "mlp.down_proj"   # the sensitive down projections in int8
    source: int8
  - match: lm_head           # keep the head in bf16
    source: base
"""


def run_demo(directory: Path, log) -> Path:
    directory = Path(directory)
    paths = {k: fixture("llama", k, log) for k in ("base", "ct-fp8-static", "ct-w8a8", "gptq")}
    directory.mkdir(parents=True, exist_ok=True)
    recipe = directory / "recipe.yaml"
    recipe.write_text(DEMO_RECIPE.format(base=paths["base"], fp8=paths["ct-fp8-static"], int8=paths["ct-w8a8"],
                                         gptq=paths["gptq"]))
    log.print(f"recipe: {recipe}")
    return recipe
