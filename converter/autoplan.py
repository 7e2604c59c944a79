"""`mpconvert plan`: measure (sensitivity.py), choose (choose.py), write a recipe and a JSON report.

validate everything cheap first (sources, budget, calibration text) — then measure — then write; the recipe is
planned once more by build's own planner before it is written, so a plan that would not build is never written.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import choose, rules, sensitivity
from .errors import UserError
from .layout import decoder_config
from .plan import Inputs, make_plan
from .recipe import load_recipe
from .safety import write_file_atomic


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
    parallel: rules.Parallel  # the sizes every recipe must build at
    # per-expert plans of a MoE model are checked against the per-layer plan of the same budget (run_plan): these
    # are the per-layer candidates (None for a dense model or --whole-experts)
    whole: choose.Candidates | None = None
    # why the calibration text measures less than plan's default for this model wants, or None
    short_text: str | None = None


DENSE_TOKENS = 512
# Per-expert choices need each expert seen on enough tokens: on the taught MoE (8 experts, top-2) per-expert plans
# beat per-layer ones on held-out text at every budget with 1536 calibration tokens (~384 routed to each expert) and
# lost at two of five with 512 (~128 each) — docs/plan.md
TOKENS_PER_EXPERT = 384


def default_tokens(inputs: Inputs, per_expert: bool) -> int:
    """Calibration tokens when --calib-tokens is not given: 512, or for per-expert plans of a MoE model enough that
    each expert is routed ~TOKENS_PER_EXPERT of them on average (experts / top-k × that)."""
    experts = inputs.info.num_experts
    if not per_expert or not experts:
        return DENSE_TOKENS
    cfg = decoder_config(inputs.base.ckpt.config)
    top_k = next((v for k in ("num_experts_per_tok", "moe_topk", "num_experts_per_token")
                  if isinstance(v := cfg.get(k), int) and v > 0), 1)
    return max(DENSE_TOKENS, TOKENS_PER_EXPERT * experts // top_k)


def prepare(sources_file: Path, budgets: list[str], calib: list[Path], tokens: int | None = None,
            parallel: rules.Parallel = rules.Parallel(), per_expert: bool = True) -> Prepared:
    parallel.check()
    recipe = load_recipe(sources_file, sources_only=True)
    if not recipe.sources:
        raise UserError(f"{sources_file}: no sources; list the quantized checkpoints plan may choose from")
    inputs = Inputs.open(recipe)
    c = choose.candidates(inputs, parallel, per_expert)
    if not any(len(s) > 1 for s in c.units.values()):
        raise UserError(f"{sources_file}: no source can serve any linear unit of the base at "
                        f"{parallel.flags()} (see `mpconvert build` for each source's "
                        f"reasons); nothing to choose")
    wanted = [(b, choose.parse_budget(b, c)) for b in budgets]
    default = default_tokens(inputs, per_expert)
    ids = sensitivity.calibration_ids(recipe.tokenizer_dirs(), calib, default if tokens is None else tokens)
    whole = choose.candidates(inputs, parallel, False) if per_expert and inputs.info.num_experts else None
    short = None
    if tokens is None and ids.numel() < default and default > DENSE_TOKENS:
        short = (f"the calibration text has {ids.numel()} tokens; per-expert choices among "
                 f"{inputs.info.num_experts} experts want {default} ({TOKENS_PER_EXPERT} routed to each on average) "
                 f"— with less, a per-expert recipe can lose to a per-layer one on other text; give more text or "
                 f"pass --whole-experts")
    return Prepared(sources_file, recipe, inputs, c, wanted, ids, parallel, whole, short)


def run_plan(p: Prepared, out: Path, device: str | None = None, on_total: Callable[[int], None] = lambda n: None,
             on_step: Callable[[], None] = lambda: None) -> list[PlanResult]:
    """Measure once, then one recipe per budget."""
    c, device = p.candidates, device or sensitivity.default_device()
    swaps, units = choose.measurements_needed(c), c.units
    if p.whole is not None:  # the per-layer candidates' swaps too (a MoE layer's experts whole)
        swaps += [k for k in choose.measurements_needed(p.whole) if k not in set(swaps)]
        units = p.whole.units | c.units
    on_total(len(swaps))
    costs, routed = sensitivity.measure(p.inputs, swaps, units, p.recipe.path_of("base"), p.ids, device, on_step)
    groups = choose.options(c, costs)
    curve = choose.frontier(groups, c.fixed_bytes)
    uniform = choose.uniform_points(c, costs)
    roles = p.inputs.roles(mtp="drop")  # as choose.candidates measures the model
    whole_groups = choose.options(p.whole, costs) if p.whole is not None else None
    model = sensitivity.base_model(p.recipe.path_of("base"), device) if p.whole is not None else None
    results = []
    for spec, budget in p.budgets:
        r = _planned(p, c, groups, costs, routed, roles, spec, budget, out)
        if p.whole is not None:
            r = _joint_check(p, r, _planned(p, p.whole, whole_groups, costs, routed, roles, spec, budget, out), out,
                             device, model)
        results.append(PlanResult(r.recipe_text, r.report, curve, uniform))
    return results


def _planned(p: Prepared, c: choose.Candidates, groups, costs: dict, routed: dict, roles: dict, spec: str,
             budget: int, out: Path) -> PlanResult:
    sol = choose.solve(groups, c.fixed_bytes, budget)
    bpw = _bits_per_weight(c, sol)
    header = [f"planned by `mpconvert plan` for --budget {spec} ({budget:,} bytes) at {p.parallel.flags()}",
              f"model {sol.nbytes:,} bytes, {bpw:.3f} bits/weight in linears, predicted KL to the base "
              f"{sol.kl:.5f} (sum of per-unit swaps measured on {p.ids.numel()} calibration tokens)"]
    text = choose.recipe_yaml(p.recipe, p.sources_file, out, c, sol, costs, roles, header)
    _check_builds(text, out, p)
    return PlanResult(text, _report(spec, budget, sol, bpw, c, costs, p.ids.numel(), routed, roles), [], {})


def _joint_check(p: Prepared, per_expert: PlanResult, per_layer: PlanResult, out: Path, device: str,
                 model) -> PlanResult:
    """One-expert swap costs need not add up (on the taught MoE a whole layer of Int8 experts measured far below
    the sum of its experts' swaps), so a MoE model's per-expert recipe is measured whole on the calibration text
    beside the per-layer recipe of the same budget, and the lower wins; the report keeps both numbers."""
    kl = {}
    for name, r in (("per_expert", per_expert), ("per_layer", per_layer)):
        with _recipe_file(r.recipe_text, out) as f:
            kl[name] = round(sensitivity.evaluate(load_recipe(f), None, 0, device, model, p.ids)["kl"], 6)
    chosen = per_layer if kl["per_layer"] < kl["per_expert"] else per_expert
    note = (f"# joint check on the calibration text: per-expert recipe KL {kl['per_expert']:.6f}, per-layer "
            f"recipe KL {kl['per_layer']:.6f} — this is the {'per-layer' if chosen is per_layer else 'per-expert'} "
            f"one\n")
    report = chosen.report | {"joint_check": kl | {"chose": "per_layer" if chosen is per_layer else "per_expert"}}
    if chosen is per_layer:  # what the per-expert plan would have done (its experts' routed shares included)
        report["per_expert_units"] = per_expert.report["units"]
    return PlanResult(note + chosen.recipe_text, report, [], {})


def _bits_per_weight(c: choose.Candidates, sol: choose.Solution) -> float:
    return 8 * sum(o.nbytes for o in sol.choice.values()) / c.linear_weights


@contextmanager
def _recipe_file(text: str, out: Path):
    """The recipe text as a file in out's directory (its relative paths resolve as the written recipe's will)."""
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=out.resolve().parent, delete=True) as f:
        f.write(text)
        f.flush()
        yield Path(f.name)


def _check_builds(text: str, out: Path, p: Prepared) -> None:
    """Plan the written recipe with build's planner (every rule build checks), from out's directory."""
    with _recipe_file(text, out) as f:
        try:
            make_plan(load_recipe(f), p.parallel)
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
    """Where the recipes of n budgets go: -o itself for one, recipe-1.yaml … for several; each recipe's report goes
    beside it (same name, .json)."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]


def check_outputs(out: Path, n: int, frontier: Path | None, force: bool) -> None:
    """Every file plan will write, checked before any measuring: none may exist without --force, none may be a
    directory, and no two may be the same file."""
    if out.suffix.lower() == ".json":
        raise UserError(f"-o {out}: each recipe's report is written beside it as .json; give the recipe a .yaml name")
    recipes = recipe_paths(out, n)
    paths = recipes + [p.with_suffix(".json") for p in recipes] + ([frontier] if frontier is not None else [])
    if len({os.path.abspath(p) for p in paths}) < len(paths):
        raise UserError(f"--frontier {frontier} is also a recipe or report path; give the plot its own name")
    for p in paths:
        if not p.parent.is_dir():
            raise UserError(f"{p.parent}: no such directory; create it or give another -o / --frontier")
        if p.is_dir() or p.is_symlink():
            raise UserError(f"{p} is a {'symbolic link' if p.is_symlink() else 'directory'}; plan writes files there "
                            f"— give another -o / --frontier")
        if p.exists() and not force:
            raise UserError(f"{p} already exists; choose another -o or pass --force to overwrite it")


def write_outputs(results: list[PlanResult], out: Path, force: bool) -> list[Path]:
    """Each recipe (recipe_paths) and its report beside it (same name, .json), each written whole or not at all."""
    written = recipe_paths(out, len(results))
    for p, r in zip(written, results):
        write_file_atomic(p, lambda tmp: tmp.write_text(r.recipe_text), force)
        report = json.dumps(r.report, indent=1, sort_keys=True) + "\n"
        write_file_atomic(p.with_suffix(".json"), lambda tmp: tmp.write_text(report), force)
    return written


def plot_frontier(curve: list[tuple[int, float]], uniform: dict[str, tuple[int, float]], chosen: list[tuple[int,
                  float]], path: Path, force: bool = False) -> None:
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
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None}), force)
    plt.close(fig)
