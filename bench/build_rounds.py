"""`mpconvert build` of two or more code versions against `cp -r && sync` and `cp -r` of the same output, in rounds:
each round runs every contender once, in turn, with the previous output removed and `sync` run before each (so no
contender pays for another's dirty pages). A shared VM's noise only ever adds time: the fastest run of each counts,
and every run is printed. Jobs: `7b` (bench/build_bench.py's Llama-7B-shaped sources, few large tensors), `v3`
(bench/v3_shaped.py's DeepSeek-V3-shaped job, many small tensors), `real` (the real SmolLM2-135M from the
fixtures: FP8 attention, W8A8 down_proj, GPTQ elsewhere) or `tiny` (the tests' 2-layer Llama from five real
producers' outputs — CT FP8, CT W8A8, GPTQ v2, AWQ, native block FP8 —: what start-up and imports cost).

    python bench/build_rounds.py --job 7b --layers 4 --rounds 5 --code HEAD~1 --code .
    python bench/build_rounds.py --job real --rounds 5 --code .

`--code .` is this checkout as it is; any other value is a git revision, exported to the work directory and run
through PYTHONPATH (each contender imports only its own code).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from scale_bench import CLI, timed  # noqa: E402


def code_root(rev: str, work: Path) -> Path:
    """A directory to put on PYTHONPATH whose `mpconvert` package is `rev`'s code (the layout pyproject maps)."""
    if rev == ".":
        src = REPO
    else:
        src = work / f"src-{rev.replace('/', '_')}"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    root = work / f"pkg-{rev.replace('/', '_')}"
    shutil.rmtree(root, ignore_errors=True)
    pkg = root / "mpconvert"
    pkg.mkdir(parents=True)
    for p in (src / "converter").iterdir():
        (pkg / p.name).symlink_to(p)
    for sub in ("cli", "runtime_shim"):
        (pkg / sub).symlink_to(src / sub)
    return root


def sources(job: str, layers: int, work: Path) -> Path:
    """The job's sources and recipe; returns the recipe."""
    d = work / "job"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    if job == "7b":
        from build_bench import RECIPE, make_source
        for kind in ("base", "fp8", "gptq"):
            make_source(d / kind, kind, 4096, 11008, layers)
        recipe = RECIPE
        files = list(d.rglob("*.safetensors"))
    elif job == "v3":
        subprocess.run([sys.executable, str(HERE / "v3_shaped.py"), str(d), "--layers", str(layers)], check=True,
                       stdout=subprocess.DEVNULL)
        recipe = (d / "recipe.yaml").read_text()
        files = list(d.rglob("*.safetensors"))
    elif job == "tiny":
        from fixtures.factory import fixture
        kinds = {"fp8": "ct-fp8-static", "int8": "ct-w8a8", "v2": "gptq-v2", "awq": "awq", "fp8blk": "native-fp8-block"}
        paths = {"base": fixture("llama", "base"), **{k: fixture("llama", v) for k, v in kinds.items()}}
        recipe = (f"base: {paths['base']}\nsources: {{{', '.join(f'{k}: {paths[k]}' for k in kinds)}}}\n"
                  "default: v2\nrules:\n"
                  "  - {match: 'self_attn.*', layers: 0, source: fp8}\n  - {match: 'mlp.*', layers: 0, source: int8}\n"
                  "  - {match: 'self_attn.*', layers: 1, source: awq}\n  - {match: lm_head, source: fp8blk}\n")
        files = [f for p in paths.values() for f in p.glob("*.safetensors")]
    else:
        from real_build_bench import real_job
        recipe, files = real_job()
    (d / "recipe.yaml").write_text(recipe)
    subprocess.run(["cat", *map(str, files)], check=True, stdout=subprocess.DEVNULL)  # page cache warm for all
    return d / "recipe.yaml"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=["7b", "v3", "real", "tiny"], default="7b")
    ap.add_argument("--layers", type=int, default=4, help="7b and v3 jobs: decoder layers")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--code", action="append", default=None, help="'.' or a git revision; repeatable")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mpc-rounds")
    a = ap.parse_args(argv)
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    recipe = sources(a.job, a.layers, work)
    d = recipe.parent
    contenders = {}
    for rev in a.code or ["."]:
        env = {**os.environ, "PYTHONPATH": str(code_root(rev, work))}
        contenders[f"build, code {rev}"] = (
            [sys.executable, *CLI, "build", str(recipe), "-o", str(d / "out"), "--json"], env)
    first_out = d / "out"
    contenders["cp -r && sync"] = (["sh", "-c", f"cp -r '{first_out}' '{d / 'copy'}' && sync"], None)
    contenders["cp -r"] = (["cp", "-r", str(first_out), str(d / "copy")], None)
    runs = {k: [] for k in contenders}
    rss = {k: 0 for k in contenders}
    for _ in range(a.rounds):
        for name, (cmd, env) in contenders.items():
            shutil.rmtree(d / "copy", ignore_errors=True)
            if name.startswith("build"):
                shutil.rmtree(d / "out", ignore_errors=True)
            os.sync()
            secs, peak = timed(cmd, env=env)
            runs[name].append(secs)
            rss[name] = max(rss[name], peak)
    out_mb = sum(p.stat().st_size for p in first_out.iterdir()) / 1e6
    base = min(runs["cp -r && sync"])
    size = f", {a.layers} layers" if a.job in ("7b", "v3") else ""
    print(f"job {a.job}{size}: output {out_mb:.0f} MB, {a.rounds} rounds\n")
    print("| contender | runs s | best s | best / (`cp -r && sync`) | peak RSS GiB |")
    print("|---|---|---:|---:|---:|")
    for name, ts in runs.items():
        print(f"| {name} | {' '.join(f'{t:.2f}' for t in ts)} | {min(ts):.2f} | {min(ts) / base:.2f} | "
              f"{rss[name] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
