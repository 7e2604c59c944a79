"""Is `mpconvert plan` worth it? On the real SmolLM2-135M-Instruct and its real quantizations (fixtures/smollm2.py):
plan at several budgets (calibrated on GPL-3 + Apache-2.0), then measure on held-out text (GFDL-1.3 + Artistic) the
KL to the base of plan's recipe, of every uniform single-source build, of hand heuristics, and of random recipes of
the plan's size — all in one run, side by side. Prints markdown tables; --plot writes the KL-vs-size figure.

Measured KL: sensitivity.evaluate (build's planner, the bytes build copies, reference dequantizers, float32 in
transformers) — what `verify --numeric --text` reports on the built directory.

    python bench/plan_bench.py [--budgets 5,5.75,6.5,7.25] [--random 20] [--calib-tokens N] [--eval-tokens 1024]
                               [--plot docs/plan-frontier.png] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.factory import fixture, smollm2, taught_text  # noqa: E402
from mpconvert import choose, sensitivity  # noqa: E402
from mpconvert.autoplan import default_tokens, prepare, run_plan  # noqa: E402
from mpconvert.plan import Inputs  # noqa: E402
from mpconvert.recipe import load_recipe  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
CALIB = [LICENSES / "GPL-3", LICENSES / "Apache-2.0"]
EVAL = [LICENSES / "GFDL-1.3", LICENSES / "Artistic"]
SOURCES = {"fp8": "fp8-dynamic", "fp8b": "fp8-block", "int8": "w8a8", "gptq": "gptq-g64"}
INT4, EIGHT = "gptq", "int8"


def sources_file(d: Path) -> Path:
    lines = [f"base: {json.dumps(str(smollm2('base')))}", "sources:"]
    lines += [f"  {k}: {json.dumps(str(smollm2(v)))}" for k, v in SOURCES.items()]
    p = d / "sources.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def assignment_recipe(d: Path, name: str, src: Path, c: choose.Candidates, picks: dict[str, str]) -> Path:
    """A recipe serving each unit from picks[unit] (the base where absent or where that source cannot)."""
    recipe = load_recipe(src, sources_only=True)
    roles = Inputs.open(recipe).roles()
    choice = {}
    for g, units in c.groups:
        sel = []
        for u in units:
            label = picks.get(u, "base")
            if not any(s.source == label for s in c.units[u]):
                label = "base"
            sel.append((u, label))
        choice[g] = choose.Option(tuple(sel), 0, 0.0)
    sol = choose.Solution(choice, 0, 0.0, [])
    p = d / f"{name}.yaml"
    p.write_text(choose.recipe_yaml(recipe, src, p, c, sol, {}, roles, [name]))
    return p


def heuristics(c: choose.Candidates, layers: int) -> dict[str, dict[str, str]]:
    out = {}
    for eight in ("int8", "fp8"):
        out[f"attention {eight} + MLP gptq"] = {u: eight if ".self_attn." in u else INT4 for u in c.units}
        out[f"down_proj {eight}, rest gptq"] = {u: eight if u.endswith("down_proj") else INT4 for u in c.units}
        edge = {0, 1, layers - 2, layers - 1}
        out[f"layers 0,1,{layers - 2},{layers - 1} {eight}, rest gptq"] = {
            u: eight if int(u.split(".")[2]) in edge else INT4 for u in c.units}
    return out


def random_picks(c: choose.Candidates, budget: int, rng: random.Random) -> dict[str, str]:
    """Every unit on its smallest source, then random units upgraded to a random larger source while the model
    fits: a random recipe of (nearly) the budget's size."""
    picks = {u: min(servers, key=lambda s: s.nbytes).source for u, servers in c.units.items()}
    size = {u: {s.source: s.nbytes for s in servers} for u, servers in c.units.items()}
    total = c.fixed_bytes + sum(size[u][picks[u]] for u in c.units)
    units = sorted(c.units)
    rng.shuffle(units)
    for u in units:
        larger = sorted(s for s in size[u] if size[u][s] > size[u][picks[u]])
        if not larger:
            continue
        s = rng.choice(larger)
        extra = size[u][s] - size[u][picks[u]]
        if total + extra <= budget:
            picks[u], total = s, total + extra
    return picks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="5.5,6,6.75,7.5", help="bits per weight in linears")
    ap.add_argument("--random", type=int, default=20)
    ap.add_argument("--calib-tokens", type=int, default=None, help="default: plan's own (autoplan.default_tokens)")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--device", default=None)
    ap.add_argument("--moe", action="store_true", help="instead: per-expert vs per-layer plans on the taught "
                                                        "Qwen3-MoE (fixtures: qwen3moe-taught)")
    a = ap.parse_args(argv)
    if a.moe:
        return moe_main(a)
    device = a.device or sensitivity.default_device()
    budgets = [f"{b}bpw" for b in a.budgets.split(",")]
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="mpc-plan-bench-") as tmp:
        d = Path(tmp)
        src = sources_file(d)
        t0 = time.perf_counter()
        results = run_plan(prepare(src, budgets, CALIB, a.calib_tokens), d / "plan.yaml", device)
        plan_s = time.perf_counter() - t0
        plan_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        a.calib_tokens = results[0].report["calibration_tokens"]
        recipe = load_recipe(src, sources_only=True)
        c = choose.candidates(Inputs.open(recipe))
        model = AutoModelForCausalLM.from_pretrained(recipe.path_of("base"), dtype=torch.float32).eval().to(device)

        def measure(path: Path) -> dict:
            return sensitivity.evaluate(load_recipe(path), EVAL, a.eval_tokens, device, model)

        fixed = {f"all {k}": assignment_recipe(d, f"all-{k}", src, c, {u: k for u in c.units}) for k in SOURCES}
        fixed.update({name: assignment_recipe(d, f"h{i}", src, c, picks)
                      for i, (name, picks) in enumerate(heuristics(c, recipe_layers(recipe)).items())})
        fixed_m = {name: measure(p) for name, p in fixed.items()}
        bf16_linear = sum(s[0].nbytes for s in c.units.values())
        rows = []
        for spec, r in zip(budgets, results):
            p = d / f"plan-{spec}.yaml"
            p.write_text(r.recipe_text)
            m = measure(p)
            budget = r.report["budget_bytes"]
            rng = random.Random(f"{spec}")
            rand = [measure(assignment_recipe(d, f"rand-{spec}-{i}", src, c, random_picks(c, budget, rng)))
                    for i in range(a.random)]
            fits = {n: x for n, x in fixed_m.items() if x["bytes"] <= budget}
            best_name = min(fits, key=lambda n: fits[n]["kl"]) if fits else None
            rows.append({"budget": spec, "bytes": m["bytes"], "bpw": r.report["bits_per_weight"],
                         "predicted": r.report["predicted_kl"], "measured": m["kl"], "ppl": m["perplexity"],
                         "ppl_base": m["perplexity_base"], "best_fixed": best_name,
                         "best_fixed_kl": fits[best_name]["kl"] if best_name else None,
                         "best_fixed_bytes": fits[best_name]["bytes"] if best_name else None,
                         "random_median": statistics.median(x["kl"] for x in rand) if rand else None,
                         "random_bytes": statistics.median(x["bytes"] for x in rand) if rand else None})
    print(f"plan: {len(budgets)} budgets in {plan_s:.0f} s on {device}, peak RSS {plan_rss:.2f} GiB "
          f"({a.calib_tokens} calibration tokens); evaluation on {a.eval_tokens} held-out tokens\n")
    print("| budget | plan MB | plan bpw | predicted KL | measured KL | pred/meas | perplexity (base) | best fixed "
          "recipe that fits | its KL | plan ≤ it | random median KL (20, same size) | plan / median |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    for r in rows:
        ok = "yes" if r["best_fixed_kl"] is None or r["measured"] <= r["best_fixed_kl"] else "**no**"
        print(f"| {r['budget']} | {r['bytes'] / 1e6:.2f} | {r['bpw']:.3f} | {r['predicted']:.5f} | "
              f"{r['measured']:.5f} | {r['predicted'] / r['measured']:.2f} | {r['ppl']:.3f} ({r['ppl_base']:.3f}) | "
              f"{r['best_fixed'] or '—'} | "
              f"{'—' if r['best_fixed_kl'] is None else round(r['best_fixed_kl'], 5)} | {ok} | {r['random_median']:.5f} | {r['measured'] / r['random_median']:.2f} |")
    print("\n| fixed recipe | MB | bpw | measured KL | perplexity |")
    print("|---|---:|---:|---:|---:|")
    for name, x in fixed_m.items():
        bpw = 8 * (x["bytes"] - c.fixed_bytes) / c.linear_weights
        print(f"| {name} | {x['bytes'] / 1e6:.2f} | {bpw:.3f} | {x['kl']:.5f} | {x['perplexity']:.3f} |")
    print(f"\nbf16 linears {bf16_linear / 1e6:.2f} MB; fixed (embeddings, norms) {c.fixed_bytes / 1e6:.2f} MB")
    if a.plot:
        plot(a.plot, results[0], rows, fixed_m)


def moe_main(a) -> None:
    """Per-expert plans against per-layer-only plans (--whole-experts) at the same budgets on the taught Qwen3-MoE
    (Int8 and GPTQ sources), KL measured on held-out text of its language; and how the plan spends its 8-bit experts
    against the router's use of them."""
    device = a.device or sensitivity.default_device()
    f = {k: fixture("qwen3moe-taught", k) for k in ("base", "ct-w8a8", "gptq")}
    moe_default = "5.25,5.75,6.25,6.75,7.25"  # the taught MoE's all-Int4 model is 5.06 bpw
    budgets = [f"{b}bpw" for b in (a.budgets if a.budgets != "5.5,6,6.75,7.5" else moe_default).split(",")]
    with tempfile.TemporaryDirectory(prefix="mpc-plan-moe-") as tmp:
        d = Path(tmp)
        src = d / "sources.yaml"
        src.write_text(f"base: {f['base']}\nsources:\n  int8: {f['ct-w8a8']}\n  gptq: {f['gptq']}\n")
        calib, held = taught_text(d / "calib.txt", 1), taught_text(d / "eval.txt", 2)
        rows = {}
        # both at the per-expert plan's calibration tokens (its default unless given), so only the choice differs
        tokens = a.calib_tokens or default_tokens(Inputs.open(load_recipe(src, sources_only=True)), True)
        print(f"calibration tokens: {tokens}\n")
        for per_expert in (True, False):
            res = run_plan(prepare(src, budgets, [calib], tokens, per_expert=per_expert),
                           d / f"p{per_expert}.yaml", device)
            for spec, r in zip(budgets, res):
                p = d / f"{spec}-{per_expert}.yaml"
                p.write_text(r.recipe_text)
                m = sensitivity.evaluate(load_recipe(p), [held], 1536, device)
                rows.setdefault(spec, {})[per_expert] = (r, m)
    print("| budget | plan MB | plan KL (measured) | per-layer MB | per-layer KL (measured) | plan / per-layer | "
          "joint check on calibration text: per-expert / per-layer KL → chosen | routed share of the Int8 experts / "
          "of the GPTQ experts |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for spec, x in rows.items():
        (re_, me), (_, ml) = x[True], x[False]
        j = re_.report.get("joint_check", {})
        joint = f"{j['per_expert']:.5f} / {j['per_layer']:.5f} → {j['chose'].replace('_', '-')}" if j else "—"
        ex = [u for u in re_.report.get("per_expert_units", re_.report["units"]).values() if "routed_share" in u]
        hot = [u["routed_share"] for u in ex if u["source"] == "int8"]
        cold = [u["routed_share"] for u in ex if u["source"] == "gptq"]
        share = (f"{statistics.mean(hot):.3f} ({len(hot)}) / {statistics.mean(cold):.3f} ({len(cold)})"
                 if hot and cold else "—")
        print(f"| {spec} | {me['bytes'] / 1e6:.3f} | {me['kl']:.5f} | {ml['bytes'] / 1e6:.3f} | {ml['kl']:.5f} | "
              f"{me['kl'] / ml['kl']:.2f} | {joint} | {share} |")


def recipe_layers(recipe) -> int:
    return json.loads((recipe.path_of("base") / "config.json").read_text())["num_hidden_layers"]


def plot(path: Path, first, rows, fixed_m):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    top = max(x["bytes"] for x in fixed_m.values()) * 1.03
    curve = [(b, k) for b, k in first.frontier if b <= top]
    ax.plot([b / 1e6 for b, _ in curve], [k for _, k in curve], "-", color="C0",
            label="plan frontier (predicted, calibration text)")
    ax.plot([r["bytes"] / 1e6 for r in rows], [r["measured"] for r in rows], "*", color="C0", markersize=13,
            label="plan recipes (measured, held-out text)")
    ax.plot([r["random_bytes"] / 1e6 for r in rows], [r["random_median"] for r in rows], "x", color="C3",
            markersize=9, label="random recipes of the plan's size, median (measured)")
    markers = "osD^v<>ph8"
    for i, (name, x) in enumerate(fixed_m.items()):
        ax.plot([x["bytes"] / 1e6], [x["kl"]], markers[i % len(markers)], color=f"C{(i % 9) + 1}",
                label=f"{name} (measured)")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("KL to bf16 (nats/token)")
    ax.set_yscale("log")
    low = min([r["measured"] for r in rows] + [x["kl"] for x in fixed_m.values()])
    ax.set_ylim(low / 3, 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M-Instruct: plan vs fixed and random recipes")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})


if __name__ == "__main__":
    main()
