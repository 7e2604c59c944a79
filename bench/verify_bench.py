"""Structural `mpconvert verify` (sha256 and a NaN scan of every tensor) and `verify --fast` of one or more code
versions against `sha256sum` over the same shard files, on the Llama-7B-shaped job of build_bench.py (few large
tensors), in rounds: each round runs every contender once, in turn; the fastest run of each counts and every run is
printed.

    python bench/verify_bench.py [--layers 4] [--rounds 3] [--code HEAD~1 --code .]

`--code` as in bench/build_rounds.py ('.' is this checkout; anything else a git revision, run through PYTHONPATH).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_bench import make_source  # noqa: E402
from build_rounds import code_root  # noqa: E402
from scale_bench import CLI, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--code", action="append", default=None, help="'.' or a git revision; repeatable")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/mpc-vbench")
    a = ap.parse_args()
    d = Path(a.workdir)
    shutil.rmtree(d, ignore_errors=True)
    for kind in ("base", "fp8", "gptq"):
        make_source(d / kind, kind, a.hidden, a.inter, a.layers)
    (d / "recipe.yaml").write_text("base: ./base\nsources: {fp8: ./fp8, gptq: ./gptq}\ndefault: gptq\nrules:\n"
                                   "  - {match: 'self_attn.*', source: fp8}\n")
    exe = str(Path(sys.executable).parent / "mpconvert")
    subprocess.run([exe, "build", str(d / "recipe.yaml"), "-o", str(d / "out"), "--json"], check=True,
                   stdout=subprocess.DEVNULL)
    shards = sorted(str(p) for p in (d / "out").glob("*.safetensors"))
    size = sum(Path(p).stat().st_size for p in shards)
    subprocess.run(["cat"] + shards, stdout=subprocess.DEVNULL, check=True)  # warm cache for all
    contenders = {"sha256sum": (["sha256sum", *shards], None)}
    for rev in a.code or ["."]:
        env = {**os.environ, "PYTHONPATH": str(code_root(rev, d))}
        for flags in ([], ["--fast"]):
            contenders[" ".join(["verify", *flags]) + f", code {rev}"] = (
                [sys.executable, *CLI, "verify", str(d / "out"), "--json", *flags], env)
    runs = {k: [] for k in contenders}
    rss = dict.fromkeys(contenders, 0)
    for _ in range(a.rounds):
        for name, (cmd, env) in contenders.items():
            secs, peak = timed(cmd, env=env)
            runs[name].append(secs)
            rss[name] = max(rss[name], peak)
    sha = min(runs["sha256sum"])
    print(f"Llama-7B-shaped output, {a.layers} layers, {size / 1e9:.2f} GB of shards, {a.rounds} rounds, "
          f"{os.cpu_count()} CPUs\n")
    print("| contender | runs s | best s | best / sha256sum | peak RSS GiB |\n|---|---|---:|---:|---:|")
    for name, times in runs.items():
        print(f"| {name} | {' '.join(f'{t:.2f}' for t in times)} | {min(times):.2f} | {min(times) / sha:.2f} | "
              f"{rss[name] / 2**30:.2f} |")
    shutil.rmtree(d)


if __name__ == "__main__":
    main()
