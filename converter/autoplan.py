"""`mpconvert plan`: measure (sensitivity.py), choose (choose.py), write a recipe and a JSON report.

validate everything cheap first (sources, budget, calibration text) — then measure — then write; the recipe is
planned once more by build's own planner before it is written, so a plan that would not build is never written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import choose, sensitivity
from .errors import UserError
from .plan import Inputs, make_plan
from .recipe import load_recipe


@dataclass
class PlanResult:
    recipe_text: str
    report: dict
    frontier: list[tuple[int, float]]
    uniform: dict[str, tuple[int, float]]


@dataclass
class Prepared:
    """Everything plan checks before measuring anything: the sources, who may serve what, the budgets, the text."""
    sources_file: Path
    recipe: object
    inputs: Inputs
    candidates: choose.Candidates
    budgets: list[tuple[str, int]]
    ids: object  # calibration token windows [n, seq]
    tp: int
    ep: int


def prepare(sources_file: Path, budgets: list[str], calib: list[Path], tokens: int, tp: int = 1, ep: int = 1,
            per_expert: bool = True) -> Prepared:
    recipe = load_recipe(sources_file, sources_only=True)
    if not recipe.sources:
        raise UserError(f"{sources_file}: no sources; list the quantized checkpoints plan may choose from")
    inputs = Inputs.open(recipe)
    c = choose.candidates(inputs, tp, ep, per_expert)
    if not any(len(s) > 1 for s in c.units.values()):
        raise UserError(f"{sources_file}: no source can serve any linear unit of the base at --tp {tp} --ep {ep} "
                        f"(see `mpconvert build` for each source's reasons); nothing to choose")
    wanted = [(b, choose.parse_budget(b, c)) for b in budgets]
    ids = sensitivity.calibration_ids(recipe.path_of("base"), calib, tokens)
    return Prepared(sources_file, recipe, inputs, c, wanted, ids, tp, ep)


def run_plan(p: Prepared, out: Path, device: str | None = None, on_total: Callable[[int], None] = lambda n: None,
             on_step: Callable[[], None] = lambda: None) -> list[PlanResult]:
    """Measure once, then one recipe per budget."""
    c = p.candidates
    swaps = choose.measurements_needed(c)
    on_total(len(swaps))
    costs, routed = sensitivity.measure(p.inputs, swaps, c.units, p.recipe.path_of("base"), p.ids, device or
                                        sensitivity.default_device(), on_step)
    groups = choose.options(c, costs)
    curve = choose.frontier(groups, c.fixed_bytes)
    uniform = choose.uniform_points(c, costs)
    roles = p.inputs.roles()
    results = []
    for spec, budget in p.budgets:
        sol = choose.solve(groups, c.fixed_bytes, budget)
        bpw = _bits_per_weight(c, sol)
        header = [f"planned by `mpconvert plan` for --budget {spec} ({budget:,} bytes) at --tp {p.tp} --ep {p.ep}",
                  f"model {sol.nbytes:,} bytes, {bpw:.3f} bits/weight in linears, predicted KL to the base "
                  f"{sol.kl:.5f} (sum of per-unit swaps measured on {p.ids.numel()} calibration tokens)"]
        text = choose.recipe_yaml(p.recipe, p.sources_file, out, c, sol, costs, roles, header)
        _check_builds(text, out, p.tp, p.ep)
        results.append(PlanResult(text, _report(spec, budget, sol, bpw, c, costs, p.ids.numel(), routed, roles),
                                  curve, uniform))
    return results


def _bits_per_weight(c: choose.Candidates, sol: choose.Solution) -> float:
    return 8 * sum(o.nbytes for o in sol.choice.values()) / c.linear_weights


def _check_builds(text: str, out: Path, tp: int, ep: int) -> None:
    """Plan the written recipe with build's planner (every rule build checks), from out's directory."""
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=out.resolve().parent, delete=True) as f:
        f.write(text)
        f.flush()
        try:
            make_plan(load_recipe(Path(f.name)), tp, ep)
        except UserError as e:
            raise AssertionError(f"plan wrote a recipe build refuses: {e}") from None


def _report(spec: str, budget: int, sol: choose.Solution, bpw: float, c: choose.Candidates, costs: dict,
            tokens: int, routed: dict[int, list[int]], roles: dict) -> dict:
    units = {}
    for opt in sol.choice.values():
        for unit, label in opt.picks:
            server = next(s for s in c.units[unit] if s.source == label)
            units[unit] = {"source": label, "scheme": server.scheme, "bytes": server.nbytes,
                           "options": {s.source: {"bytes": s.nbytes, "kl": choose.unit_cost(costs, s.source, unit)}
                                       for s in c.units[unit]}}
            role = roles[server.modules[0]]
            if role.layer in routed and {roles[m].expert for m in server.modules} == {role.expert} != {None}:
                counts = routed[role.layer]  # one expert: the share of the layer's routed slots it received
                units[unit]["routed_share"] = round(counts[role.expert] / max(sum(counts), 1), 5)
    return {"budget": spec, "budget_bytes": budget, "bytes": sol.nbytes, "bits_per_weight": round(bpw, 4),
            "predicted_kl": round(sol.kl, 6), "calibration_tokens": tokens, "units": units}


def recipe_paths(out: Path, n: int) -> list[Path]:
    """Where the recipes of n budgets go: -o itself for one, recipe-1.yaml … for several."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]


def write_outputs(results: list[PlanResult], out: Path) -> list[Path]:
    """Each recipe (recipe_paths) and its report beside it (same name, .json)."""
    written = recipe_paths(out, len(results))
    for p, r in zip(written, results):
        p.write_text(r.recipe_text)
        p.with_suffix(".json").write_text(json.dumps(r.report, indent=1, sort_keys=True) + "\n")
    return written


def plot_frontier(curve: list[tuple[int, float]], uniform: dict[str, tuple[int, float]], chosen: list[tuple[int,
                  float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--frontier PNG needs matplotlib (make setup installs it)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([b / 1e6 for b, _ in curve], [k for _, k in curve], "-", label="plan (predicted)")
    for label, (b, k) in sorted(uniform.items()):
        ax.plot([b / 1e6], [k], "o", label=f"all {label} (predicted)")
    for b, k in chosen:
        ax.plot([b / 1e6], [k], "k*")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("KL to the base (nats/token)")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
