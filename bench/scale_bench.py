"""The DeepSeek-V3-shaped scale benchmark (issue: a V3-sized job in seconds): build, verify, verify --fast and inspect
on the job of bench/v3_shaped.py at N and 2N layers, each beside its baseline in the same run (`cp -r && sync` of
the output, `sha256sum` of its shards), with every command's peak RSS. Each command runs --runs times (3) and the
fastest is reported, baselines alike; the peak RSS is the largest. Prints one table (markdown).

    python bench/scale_bench.py [--layers 30] [--workdir /tmp/mpc-scale] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MPCONVERT = str(Path(sys.executable).parent / "mpconvert")


# the CLI of whichever mpconvert is on PYTHONPATH (the rounds benchmarks run several code versions this way)
CLI = ["-c", "from mpconvert.cli.main import main; main()"]
# planning alone (what build does before writing a byte) of the job in the current directory at --tp 8 --ep 8, as
# build runs it (cli.main.build: the CLI's GC thresholds, the cyclic collector paused while planning), ending as the
# CLI does (cli.main._exit_now: no teardown of the sources' objects); the sizes as a rules.Parallel, or as
# make_plan's loose arguments for code older than it (the rounds compare revisions)
PLANNING = ["-c", "import gc, os; gc.set_threshold(50_000, 50, 100); gc.disable(); "
                  "from mpconvert.recipe import load_recipe; from mpconvert.plan import make_plan\n"
                  "try:\n    from mpconvert.rules import Parallel; sizes = (Parallel(8, 8),)\n"
                  "except ImportError:\n    sizes = (8, 8)\n"
                  "make_plan(load_recipe('recipe.yaml'), *sizes); os._exit(0)"]


def timed(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command (GNU time's %M). Python may cache bytecode, as it does for an
    installed package (some machines set PYTHONDONTWRITEBYTECODE, which makes every run recompile mpconvert: ~0.1 s)."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONDONTWRITEBYTECODE"}
    rss = Path(os.environ.get("TMPDIR", "/tmp")) / f"mpc-scale-rss-{os.getpid()}"
    t = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], check=True, cwd=cwd, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t, int(rss.read_text().split()[-1]) * 1024


def best(cmd: list[str], cwd: Path, runs: int, before: str | None = None) -> tuple[float, int]:
    """The fastest of `runs` runs (noise on a shared VM only ever adds time) and the largest peak RSS; `before`: a
    shell command run ahead of each (untimed)."""
    times, peaks = [], []
    for _ in range(runs):
        if before:
            subprocess.run(["sh", "-c", before], check=True, cwd=cwd)
        t, rss = timed(cmd, cwd)
        times.append(t)
        peaks.append(rss)
    return min(times), max(peaks)


def run(work: Path, layers: int, runs: int) -> dict:
    d = work / f"L{layers}"
    if not (d / "recipe.yaml").exists():
        subprocess.run([sys.executable, str(HERE / "v3_shaped.py"), str(d), "--layers", str(layers)], check=True)
    shutil.rmtree(d / "out", ignore_errors=True)
    subprocess.run(["cat", *map(str, d.rglob("*.safetensors"))], check=True, stdout=subprocess.DEVNULL)  # warm
    res = {"layers": layers}
    res["plan_s"], res["plan_rss"] = best([sys.executable, *PLANNING], d, runs)
    res["build_s"], res["build_rss"] = best([MPCONVERT, "build", "recipe.yaml", "-o", "out", "--tp", "8", "--ep",
                                             "8"], d, runs, before="rm -rf out")
    m = json.loads((d / "out" / "mpconvert_manifest.json").read_text())
    res["tensors"] = len(m["tensors"]["name"])
    res["output_gb"] = sum(p.stat().st_size for p in (d / "out").iterdir()) / 1e9
    res["manifest_mb"] = (d / "out" / "mpconvert_manifest.json").stat().st_size / 1e6
    res["cp_sync_s"], _ = best(["sh", "-c", "cp -r out copy && sync"], d, runs, before="rm -rf copy")
    shutil.rmtree(d / "copy")
    res["verify_s"], res["verify_rss"] = best([MPCONVERT, "verify", "out", "--tp", "8", "--ep", "8"], d, runs)
    res["fast_s"], res["fast_rss"] = best([MPCONVERT, "verify", "out", "--tp", "8", "--ep", "8", "--fast"], d, runs)
    res["sha256sum_s"], _ = best(["sh", "-c", "sha256sum out/*.safetensors"], d, runs)
    res["inspect_s"], res["inspect_rss"] = best([MPCONVERT, "inspect", "out", "--no-modules"], d, runs)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mpc-scale"))
    ap.add_argument("--runs", type=int, default=3, help="runs of each command; the fastest is reported")
    a = ap.parse_args(argv)
    rows = [run(a.workdir, n, a.runs) for n in (a.layers, 2 * a.layers)]
    gib = 2 ** 30
    print("| layers | tensors | output GB | manifest MB | planning s | build s | cp -r && sync s | build / copy | "
          "verify s | sha256sum s | verify / sha256sum | verify --fast s | inspect s | peak RSS GiB (planning / build "
          "/ verify / fast / inspect) |")
    print("|" + "---:|" * 14)
    for r in rows:
        print(f"| {r['layers']} | {r['tensors']:,} | {r['output_gb']:.2f} | {r['manifest_mb']:.0f} | "
              f"{r['plan_s']:.1f} | {r['build_s']:.1f} | {r['cp_sync_s']:.1f} | {r['build_s'] / r['cp_sync_s']:.1f} | "
              f"{r['verify_s']:.1f} | "
              f"{r['sha256sum_s']:.1f} | {r['verify_s'] / r['sha256sum_s']:.1f} | {r['fast_s']:.1f} | "
              f"{r['inspect_s']:.1f} | {r['plan_rss'] / gib:.2f} / {r['build_rss'] / gib:.2f} / "
              f"{r['verify_rss'] / gib:.2f} / "
              f"{r['fast_rss'] / gib:.2f} / {r['inspect_rss'] / gib:.2f} |")
    a1, a2 = rows
    grew = {what: a2[key] / a1[key] for what, key in (("planning", "plan_s"), ("build", "build_s"),
                                                       ("verify", "verify_s"), ("verify --fast", "fast_s"),
                                                       ("inspect", "inspect_s"))}
    more = a2["tensors"] / a1["tensors"]  # more than 2×: the first 3 layers are dense, so 2× layers is 2.1× tensors
    print(f"\n2× layers = ×{more:.2f} tensors: " + ", ".join(f"{w} ×{g:.2f}" for w, g in grew.items()))
    print("time per tensor, 2× layers against 1×: " + ", ".join(f"{w} ×{g / more:.2f}" for w, g in grew.items()))


if __name__ == "__main__":
    main()
