"""Planning, `verify --fast`, `verify` and `inspect` of two or more code versions on the DeepSeek-V3-shaped job
(bench/v3_shaped.py), in rounds: each round runs every command of every contender once, in turn, on the same built
output (built once, by the first contender), with `sha256sum` of its shards beside them. A shared VM's noise only
ever adds time: the fastest run counts, and every run is printed.

    python bench/scale_rounds.py --layers 60 --rounds 5 --code e12b656 --code .

`--code` as in bench/build_rounds.py ('.' is this checkout; anything else a git revision, run through PYTHONPATH).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_rounds import code_root  # noqa: E402
from scale_bench import CLI, PLANNING, timed  # noqa: E402

COMMANDS = {  # what each contender runs, in the job's directory
    "planning": PLANNING,  # as scale_bench measures it (no teardown, for every contender)
    "verify --fast": [*CLI, "verify", "out", "--tp", "8", "--ep", "8", "--fast"],
    "verify": [*CLI, "verify", "out", "--tp", "8", "--ep", "8"],
    "inspect": [*CLI, "inspect", "out", "--no-modules"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--code", action="append", default=None, help="'.' or a git revision; repeatable")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mpc-scale-rounds")
    a = ap.parse_args(argv)
    work, revs = a.workdir, a.code or ["."]
    d = work / f"L{a.layers}"
    if not (d / "recipe.yaml").exists():
        subprocess.run([sys.executable, str(HERE / "v3_shaped.py"), str(d), "--layers", str(a.layers)], check=True,
                       stdout=subprocess.DEVNULL)
    envs = {rev: {**os.environ, "PYTHONPATH": str(code_root(rev, work))} for rev in revs}
    shutil.rmtree(d / "out", ignore_errors=True)
    subprocess.run([sys.executable, *CLI, "build", "recipe.yaml", "-o", "out", "--tp", "8", "--ep", "8"], cwd=d,
                   env=envs[revs[0]], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["cat", *map(str, d.rglob("*.safetensors"))], check=True, stdout=subprocess.DEVNULL)  # warm
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for name, args in COMMANDS.items():
            for rev in revs:
                runs.setdefault((name, rev), []).append(timed([sys.executable, *args], cwd=d, env=envs[rev])[0])
        runs.setdefault(("sha256sum", "—"), []).append(timed(["sh", "-c", "sha256sum out/*.safetensors"], cwd=d)[0])
    print(f"V3-shaped job, {a.layers} layers, {a.rounds} rounds\n")
    print("| command | code | runs s | best s |")
    print("|---|---|---|---:|")
    for (name, rev), ts in runs.items():
        print(f"| {name} | {rev} | {' '.join(f'{t:.2f}' for t in ts)} | {min(ts):.2f} |")


if __name__ == "__main__":
    main()
