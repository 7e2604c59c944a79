"""mpconvert plan: the solver on synthetic costs (feasible, optimal at its breakpoints, monotone, deterministic), the
command end to end on real quantizer outputs (its recipe builds unchanged, at the bytes it reported, folded-scale
pairs kept together), bad inputs, and the real SmolLM2 model. Plan quality (KL vs fixed and random recipes on
held-out text) is bench/plan_bench.py's job; its recorded results are in docs/plan.md."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from helpers import manifest_json, refused
from mpconvert import choose
from mpconvert.manifest import MANIFEST

LICENSES = Path("/usr/share/common-licenses")


# ---- the solver ---------------------------------------------------------------------------------------------------
def _groups(rng: random.Random, n: int) -> list[choose.Group]:
    out = []
    for i in range(n):
        g = choose.Group(f"g{i}", (f"u{i}",))
        for j in range(rng.randint(1, 4)):
            g.options.append(choose.Option(((f"u{i}", f"s{j}"),), rng.randint(1, 50) * 10, rng.random()))
        out.append(g)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_solver_is_feasible_monotone_and_optimal_at_its_breakpoints(seed):
    rng = random.Random(seed)
    groups = _groups(rng, rng.randint(1, 5))
    hulls = [choose._hull(g.options) for g in groups]
    best_at = {}
    for combo in itertools.product(*hulls):  # every combination of hull options, brute force
        b, k = 7 + sum(o.nbytes for o in combo), sum(o.kl for o in combo)
        best_at[b] = min(best_at.get(b, k), k)
    path = choose.frontier(groups, 7)
    for b, k in path:  # the greedy's breakpoints are optimal for their own byte count
        assert k <= min(v for bb, v in best_at.items() if bb <= b) + 1e-9
    prev = None
    for budget in sorted({b for b, _ in path} | {b + 5 for b, _ in path}):
        sol = choose.solve(groups, 7, budget)
        assert sol.nbytes <= budget
        assert sol.nbytes == 7 + sum(o.nbytes for o in sol.choice.values())
        assert abs(sol.kl - sum(o.kl for o in sol.choice.values())) < 1e-9
        if prev is not None:
            assert sol.kl <= prev + 1e-12  # more room never plans worse
        prev = sol.kl
        assert choose.solve(groups, 7, budget) == sol  # deterministic


def test_hull_drops_dominated_and_concave_options():
    o = lambda b, k: choose.Option((("u", f"{b}"),), b, k)  # noqa: E731
    opts = [o(10, 1.0), o(20, 1.2), o(30, 0.4), o(40, 0.3), o(50, 0.0), o(35, 0.9), o(45, 0.25)]
    # 20, 35: dominated; 40 and 45: above the 30→50 segment (0.2 and 0.1 there)
    assert [x.nbytes for x in choose._hull(opts)] == [10, 30, 50]
    collinear = [o(10, 1.0), o(30, 0.5), o(50, 0.0)]
    assert [x.nbytes for x in choose._hull(collinear)] == [10, 50]  # a middle point on the line adds nothing


def test_a_folded_scale_source_serves_its_group_whole_or_not_at_all():
    U = choose.UnitSource
    a = [U("a", "base", ("a",), 100, "bf16", False), U("a", "awq", ("a",), 30, "awq", True),
         U("a", "int8", ("a",), 50, "int8", False)]
    b = [U("b", "base", ("b",), 100, "bf16", False), U("b", "int8", ("b",), 50, "int8", False)]
    c = choose.Candidates(None, {"a": a, "b": b}, [("a+b", ("a", "b"))], 10, 100)  # AWQ cannot serve b
    need = choose.measurements_needed(c)
    assert sorted(need) == [("int8", "a"), ("int8", "b")]
    cost = {k: 0.1 for k in need}
    [g] = choose.options(c, cost)
    assert len(g.options) == 4 and all("awq" not in dict(o.picks).values() for o in g.options)
    assert choose.uniform_points(c, cost)["awq"] == (210, 0.0)  # the base serves the group
    b.append(U("b", "awq", ("b",), 30, "awq", True))  # now it can: one joint option, measured jointly
    need = choose.measurements_needed(c)
    assert ("awq", "a", "b") in need and ("awq", "a") not in need
    cost = {k: 0.05 if k[0] == "awq" else 0.1 for k in need}
    [g] = choose.options(c, cost)
    joint = [o for o in g.options if "awq" in dict(o.picks).values()]
    assert [(o.picks, o.nbytes, o.kl) for o in joint] == [((("a", "awq"), ("b", "awq")), 60, 0.05)]
    assert choose.uniform_points(c, cost)["awq"] == (70, 0.05)


# ---- the command on real quantizer outputs ------------------------------------------------------------------------
def _sources(tmp_path: Path, llama: dict, kinds: dict[str, str]) -> Path:
    lines = [f"base: {llama['base']}", "sources:"] + [f"  {k}: {llama[v]}" for k, v in kinds.items()]
    p = tmp_path / "sources.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


ALL = {"fp8": "ct-fp8-dynamic", "int8": "ct-w8a8", "gptq": "gptq", "awq": "awq"}


def test_plan_writes_recipes_that_build_at_the_reported_size(cli, llama, tmp_path):
    src = _sources(tmp_path, llama, ALL)
    r = cli("plan", src, "--budget", "0.55x", "--budget", "0.7x", "--calib", LICENSES / "GPL-3", "-o",
            tmp_path / "r.yaml", "--frontier", tmp_path / "f.png", "--calib-tokens", 256)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kls = []
    for i in (1, 2):
        recipe, report = tmp_path / f"r-{i}.yaml", json.loads((tmp_path / f"r-{i}.json").read_text())
        assert report["bytes"] <= report["budget_bytes"]
        out = tmp_path / f"out{i}"
        b = cli("build", recipe, "-o", out)
        assert b.exit_code == 0, b.output
        m = manifest_json(out)
        assert m["totals"]["bytes"] == report["bytes"]  # plan's accounting is build's
        sources = {u["source"] for u in report["units"].values()}
        assert len(sources) >= 2, sources  # a mix, not one format
        for layer in range(2):  # AWQ folds v→o and up→down: a pair is served by AWQ together or not at all
            for a, b_ in (("self_attn.qkv_proj", "self_attn.o_proj"), ("mlp.gate_up_proj", "mlp.down_proj")):
                pa = report["units"][f"model.layers.{layer}.{a}"]["source"]
                pb = report["units"][f"model.layers.{layer}.{b_}"]["source"]
                assert (pa == "awq") == (pb == "awq"), (layer, a, pa, pb)
        kls.append(report["predicted_kl"])
    assert kls[1] <= kls[0]  # the larger budget predicts no worse
    again = tmp_path / "again.yaml"
    assert cli("plan", src, "--budget", "0.55x", "--calib", LICENSES / "GPL-3", "-o", again, "--calib-tokens",
               256).exit_code == 0
    assert again.read_text() == (tmp_path / "r-1.yaml").read_text()  # deterministic


def test_plan_json_output(cli, llama, tmp_path):
    src = _sources(tmp_path, llama, {"int8": "ct-w8a8", "gptq": "gptq"})
    r = cli("plan", src, "--budget", "0.6x", "--calib", LICENSES / "GPL-3", "-o", tmp_path / "r.yaml", "--json",
            "--calib-tokens", 128)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    rep = data["reports"][0]
    assert rep["bytes"] <= rep["budget_bytes"] and data["recipes"] == [str(tmp_path / "r.yaml")]
    assert set(data["uniform"]) == {"int8", "gptq"}
    assert all(b1 <= b2 and k2 <= k1 + 1e-12 for (b1, k1), (b2, k2) in zip(data["frontier"], data["frontier"][1:]))


@pytest.mark.parametrize("budget,match", [
    ("0.1x", "below the smallest model these sources make"),
    ("2x", "above the bf16 model"),
    ("10", "below the smallest model"),
    ("abc", "use bytes (3.5GB, 120MB), bits per weight"),
    ("-1bpw", "is not positive"),
])
def test_plan_refuses_budgets_it_cannot_meet(cli, llama, tmp_path, budget, match):
    src = _sources(tmp_path, llama, {"int8": "ct-w8a8", "gptq": "gptq"})
    refused(cli("plan", src, "--budget", budget, "--calib", LICENSES / "GPL-3", "-o", tmp_path / "r.yaml"), match)
    assert not (tmp_path / "r.yaml").exists()


def test_plan_refuses_bad_inputs(cli, llama, tmp_path):
    src = _sources(tmp_path, llama, {"int8": "ct-w8a8"})
    calib = LICENSES / "GPL-3"
    empty, tiny, binary = tmp_path / "empty.txt", tmp_path / "tiny.txt", tmp_path / "bin.txt"
    empty.write_text("")
    tiny.write_text("Just a few words of text.")
    binary.write_bytes(b"\xff\xfe\x00bad")
    out = tmp_path / "r.yaml"
    refused(cli("plan", src, "--budget", "0.7x", "--calib", empty, "-o", out), "plan needs at least 64")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", tiny, "-o", out), "plan needs at least 64")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", binary, "-o", out), "cannot read it as UTF-8")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", tmp_path / "nope.txt", "-o", out), "nope.txt: no such file")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", tmp_path, "-o", out), "is a directory")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", calib, "-o", out, "--calib-tokens", 10), "give 64 to")
    only_base = _sources(tmp_path, llama, {"copy": "base"})  # a "source" that quantizes nothing
    refused(cli("plan", only_base, "--budget", "0.9x", "--calib", calib, "-o", out), "no source can serve")
    with_rules = tmp_path / "rules.yaml"
    with_rules.write_text(src.read_text() + "default: int8\nrules:\n  - {match: lm_head, source: base}\n")
    refused(cli("plan", with_rules, "--budget", "0.7x", "--calib", calib, "-o", out), "has no rules")
    out.write_text("mine")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", calib, "-o", out), "already exists")
    assert out.read_text() == "mine"
    refused(cli("plan", src, "--budget", "0.7x", "--calib", calib, "-o", tmp_path / "x.yaml", "--tp", "3"),
             "--tp 3: num_attention_heads")
    # each was an internal error (a ZeroDivisionError, torch's own device errors)
    plan = ["plan", src, "--budget", "0.7x", "--calib", calib, "-o", tmp_path / "y.yaml"]
    refused(cli(*plan, "--tp", "0"), "between 1 and 4096")
    refused(cli(*plan, "--device", "xyz"), "not a torch device")
    refused(cli(*plan, "--device", "cuda:99"), "CUDA device(s); use cpu or one it has")
    refused(cli(*plan, "--device", "meta"), "plan measures on cpu or cuda")


def test_plan_tokenizes_its_text_as_build_takes_the_tokenizer(cli, llama, tmp_path):
    """plan tokenized --calib with the base's tokenizer only: a base without one was an internal error (transformers'
    "Couldn't instantiate the backend tokenizer"). Now it is the tokenizer build's output gets (Recipe.side_file_order:
    the base's, else a source's); with none anywhere, one line."""
    from helpers import without_tokenizer

    fx = {**llama, "base": without_tokenizer(llama["base"], tmp_path / "base"),
          "gptq-bare": without_tokenizer(llama["gptq"], tmp_path / "gptq-bare")}
    calib = LICENSES / "GPL-3"
    src = _sources(tmp_path, fx, {"int8": "ct-w8a8", "gptq": "gptq-bare"})
    r = cli("plan", src, "--budget", "0.6x", "--calib", calib, "-o", tmp_path / "r.yaml", "--calib-tokens", 128)
    assert r.exit_code == 0, r.output
    r = cli("build", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert r.exit_code == 0 and "taken from source 'int8'" in " ".join(r.output.split()), r.output
    bare = _sources(tmp_path, fx, {"gptq": "gptq-bare"})
    refused(cli("plan", bare, "--budget", "0.6x", "--calib", calib, "-o", tmp_path / "r2.yaml"),
            f"--calib: nothing to tokenize the text with — no tokenizer (tokenizer.json, tokenizer.model, vocab.json) "
            f"in {fx['base']} or {fx['gptq-bare']}")


def test_plan_never_overwrites_what_it_was_not_told_to(cli, llama, tmp_path):
    """Every file plan writes — each recipe, its .json report, the --frontier plot — is checked before measuring:
    an existing report was overwritten without --force, `-o r.json` made the report overwrite its own recipe, and a
    directory at -o was an internal error."""
    src = _sources(tmp_path, llama, {"int8": "ct-w8a8"})
    calib, out = LICENSES / "GPL-3", tmp_path / "r.yaml"
    (tmp_path / "r.json").write_text("mine")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", calib, "-o", out), f"{tmp_path / 'r.json'} already exists")
    (tmp_path / "r-2.json").write_text("mine")
    refused(cli("plan", src, "--budget", "0.7x", "--budget", "0.8x", "--calib", calib, "-o", tmp_path / "r.yaml"),
            f"{tmp_path / 'r-2.json'} already exists")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", calib, "-o", tmp_path / "p.json"),
            "give the recipe a .yaml name")
    (tmp_path / "d.yaml").mkdir()
    refused(cli("plan", src, "--budget", "0.7x", "--calib", calib, "-o", tmp_path / "d.yaml", "--force"),
            "is a directory; plan writes files there")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", calib, "-o", tmp_path / "q.yaml", "--frontier",
                tmp_path / "q.json"), "is also a recipe or report path")
    refused(cli("plan", src, "--budget", "0.7x", "--calib", calib, "-o", tmp_path / "no" / "q.yaml"),
            "no such directory")
    assert (tmp_path / "r.json").read_text() == "mine" and (tmp_path / "r-2.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if "mpconvert" in p.name) == []


def test_plan_on_the_real_model(cli, real, tmp_path):
    """SmolLM2-135M with its real Int8 and GPTQ g64 quantizations: between the all-Int4 and all-Int8 sizes plan mixes
    the two, predicts less KL than all-Int4, and its recipe builds."""
    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {real['base']}\nsources:\n  int8: {real['w8a8']}\n  gptq: {real['gptq-g64']}\n")
    r = cli("plan", src, "--budget", "5.5bpw", "--calib", LICENSES / "GPL-3", "-o", tmp_path / "r.yaml", "--json",
            "--calib-tokens", 64)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    rep = data["reports"][0]
    assert 5.0 < rep["bits_per_weight"] <= 5.5
    assert {u["source"] for u in rep["units"].values()} == {"int8", "gptq"}
    assert rep["predicted_kl"] < data["uniform"]["gptq"][1]
    b = cli("build", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert b.exit_code == 0, b.output
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["totals"]["bytes"] == rep["bytes"]


def test_plan_per_expert_on_a_taught_moe(cli, taught_moe, tmp_path):
    """A trained Qwen3-MoE (its router has favourites) with real Int8 and GPTQ sources: the per-expert plan mixes
    formats inside a MoE layer, gives the precise format to the experts its router uses most, and builds."""
    from fixtures.factory import taught_text

    f = taught_moe
    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {f['base']}\nsources:\n  int8: {f['ct-w8a8']}\n  gptq: {f['gptq']}\n")
    calib = taught_text(tmp_path / "calib.txt", 1)
    r = cli("plan", src, "--budget", "6bpw", "--calib", calib, "-o", tmp_path / "r.yaml", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["reports"][0]
    assert rep["calibration_tokens"] == 1536  # default for 8 experts, top-2: 384 routed to each on average
    joint = rep["joint_check"]  # the per-expert recipe measured whole against the per-layer one; the lower wins
    assert joint["chose"] == min(("per_expert", "per_layer"), key=lambda k: (joint[k], k != "per_expert"))
    experts = {u: x for u, x in rep.get("per_expert_units", rep["units"]).items() if ".experts." in u}
    assert len(experts) == 16 and all("routed_share" in x for x in experts.values())
    by_layer = {}
    for u, x in experts.items():
        by_layer.setdefault(u.split(".")[2], set()).add(x["source"])
    assert any(s == {"int8", "gptq"} for s in by_layer.values()), by_layer  # a layer whose experts mix formats
    share = {s: [x["routed_share"] for x in experts.values() if x["source"] == s] for s in ("int8", "gptq")}
    assert sum(share["int8"]) / len(share["int8"]) > sum(share["gptq"]) / len(share["gptq"]), share  # hot → precise
    b = cli("build", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert b.exit_code == 0, b.output
    mixed = any(u["format"] == "mixed_experts" for u in json.loads((tmp_path / "out" / MANIFEST).read_text())[
        "units"].values())
    assert mixed == (joint["chose"] == "per_expert")
    assert "warning" not in r.stderr  # the taught text has the 1536 tokens the default wants
    short = tmp_path / "short.txt"
    short.write_text(calib.read_text()[:1500])
    s = cli("plan", src, "--budget", "6bpw", "--calib", short, "-o", tmp_path / "s.yaml", "--json")
    assert s.exit_code == 0 and "want 1536 (384 routed to each on average)" in " ".join(s.stderr.split())
    w = cli("plan", src, "--budget", "6bpw", "--calib", calib, "-o", tmp_path / "w.yaml", "--json", "--whole-experts")
    assert w.exit_code == 0, w.output
    whole = json.loads(w.stdout)["reports"][0]
    assert whole["calibration_tokens"] == 512  # one choice per layer: the dense default
    assert all(".experts." not in u or u.endswith(".experts") for u in whole["units"])  # one unit per MoE layer
    assert cli("build", tmp_path / "w.yaml", "-o", tmp_path / "out-w").exit_code == 0


def test_fused_experts_quantize_each_experts_inputs_as_sglang_does(taught_moe, tmp_path):
    """An Int8 (W8A8) expert of a fused transformers MoE layer gets its inputs quantized per token, as SGLang's Int8
    MoE kernel quantizes them (its w13 input and its w2 input), inside the layer's expert loop: a lone token routed to
    it alone gives down(q(act·up(q(x)))); the loop is transformers' own to the bit with no quantizer; restore() puts
    the class's loop and the base weights back."""
    import torch

    from mpconvert.formats import FORMATS
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe
    from mpconvert.sensitivity import Swaps, base_model

    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {taught_moe['base']}\nsources:\n  int8: {taught_moe['ct-w8a8']}\n")
    recipe = load_recipe(src, sources_only=True)
    inputs = Inputs.open(recipe)
    model = base_model(recipe.path_of("base"), "cpu")
    experts = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, experts.gate_up_proj.shape[2], generator=gen)
    route = torch.tensor([[3, 1], [0, 2], [3, 5], [4, 6], [7, 1], [3, 2]])
    weights = torch.rand(6, 2, generator=gen)
    with torch.no_grad():
        before = experts(x, route, weights)
    swaps = Swaps(model, "cpu")
    names = [f"model.layers.0.mlp.experts.3.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    for n in names:
        swaps.linear(n, inputs.sources["int8"].modules[n], *inputs.base.modules[n].tensors["weight"].shape)
    assert "forward" in vars(experts)  # the instance's loop, with expert 3's quantizers
    lone = torch.tensor([[3, 3]]), torch.tensor([[1.0, 0.0]])
    with torch.no_grad():
        got = experts(x[:1], *lone)
        view = inputs.sources["int8"].modules[names[0]]
        q = lambda v: FORMATS["int8"].quantize_activations(v, view.scheme.params, {})  # noqa: E731

        def expert3(quantize):
            gate, up = torch.nn.functional.linear(quantize(x[:1]), experts.gate_up_proj[3]).chunk(2, dim=-1)
            return torch.nn.functional.linear(quantize(experts.act_fn(gate) * up), experts.down_proj[3])

        assert torch.allclose(got, expert3(q), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, expert3(lambda v: v), rtol=1e-3, atol=1e-5)  # weight-only is not what runs
        quantizers = dict(swaps._fused[id(experts)].quantizers)
        swaps._fused[id(experts)].quantizers.clear()
        assert torch.equal(experts(x, route, weights), type(experts).forward(experts, x, route, weights))
        swaps._fused[id(experts)].quantizers.update(quantizers)
        assert not torch.equal(experts(x, route, weights), type(experts).forward(experts, x, route, weights))
    swaps.restore()
    assert "forward" not in vars(experts)
    with torch.no_grad():
        assert torch.equal(experts(x, route, weights), before)


def test_plan_offers_gptq_for_deepseeks_dense_mlp_when_it_stays_whole(deepseek, tmp_path):
    """plan's candidates follow --moe-dense-tp-size as build does: on the real DeepSeek-V2 fixtures at --tp 8 --ep 8
    --dp 2, layer 0's dense down_proj (512 inputs, 64 per rank: half a GPTQ group) cannot be GPTQ — unless
    --moe-dense-tp-size 1 keeps it whole; the shared experts' down_proj is split either way."""
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe
    from mpconvert.rules import Parallel

    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {deepseek['base']}\nsources:\n  gptq: {deepseek['gptq']}\n  int8: {deepseek['ct-w8a8']}\n")
    inputs = Inputs.open(load_recipe(src, sources_only=True))

    def servers(dense_tp):
        units = choose.candidates(inputs, Parallel(8, 8, 2, dense_tp)).units
        return {u: sorted(s.source for s in units[u]) for u in ("model.layers.0.mlp.down_proj",
                                                                 "model.layers.1.mlp.shared_experts.down_proj")}
    assert servers(None) == {"model.layers.0.mlp.down_proj": ["base", "int8"],
                             "model.layers.1.mlp.shared_experts.down_proj": ["base", "int8"]}
    assert servers(1) == {"model.layers.0.mlp.down_proj": ["base", "gptq", "int8"],
                          "model.layers.1.mlp.shared_experts.down_proj": ["base", "int8"]}


def test_plans_deepseek_candidates_keep_to_the_mla_and_dtype_rules(deepseek, tmp_path):
    """plan offers a unit only servers build accepts, rules that couple units included: no packed int4 in the MLA
    projections (rules.mla_problems), and no FP8/Int8 kv_b_proj (absorbed in bfloat16) where GPTQ experts (float16
    only) are on offer — else a budget could pick both and write a recipe build refuses (plan's own check then
    fails). Without GPTQ among the sources the quantized kv_b_proj is offered again."""
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe

    def servers(**sources):
        src = tmp_path / "sources.yaml"
        src.write_text(f"base: {deepseek['base']}\nsources:\n" + "".join(f"  {k}: {deepseek[v]}\n"
                                                                         for k, v in sources.items()))
        units = choose.candidates(Inputs.open(load_recipe(src, sources_only=True))).units
        return {u.split(".", 3)[3]: sorted(s.source for s in units[u]) for u in (
            "model.layers.0.self_attn.kv_b_proj", "model.layers.0.self_attn.fused_qkv_a_proj_with_mqa",
            "model.layers.1.mlp.experts.0")}

    assert servers(gptq="gptq", int8="ct-w8a8", fp8="ct-fp8-block") == {
        "self_attn.kv_b_proj": ["base"], "self_attn.fused_qkv_a_proj_with_mqa": ["base", "fp8", "int8"],
        "mlp.experts.0": ["base", "fp8", "gptq", "int8"]}
    assert servers(int8="ct-w8a8", fp8="ct-fp8-block")["self_attn.kv_b_proj"] == ["base", "fp8", "int8"]


@pytest.mark.parametrize("arch", ["glm4moe", "qwen2moe", "deepseek", "mixtral"])
def test_routing_counts_are_what_the_experts_receive(arch, request, tmp_path):
    """The report's routed shares count the experts each token is sent to as the model routes it. They were a top-k
    of the router's logits, which is not DeepSeek-V3's or GLM-4.5's routing (sigmoid scores plus a correction bias,
    chosen by group), and sized by the highest expert seen: a DeepSeek-V3 with 256 experts, some reached by no
    calibration token, crashed `plan` (IndexError). Here GLM-4.5's correction bias sends every token to expert 3 and
    none to expert 7 — which its logits alone would not."""
    import json as _json

    import torch

    from helpers import edited_source
    from mpconvert.sensitivity import Tail

    from fixtures.factory import fixture

    base = fixture("mixtral") if arch == "mixtral" else request.getfixturevalue(arch)["base"]
    if arch == "glm4moe":
        def biased(sd):
            for name in [n for n in sd if n.endswith("e_score_correction_bias")]:
                sd[name] = torch.zeros_like(sd[name])
                sd[name][3], sd[name][7] = 10.0, -10.0
        base = edited_source(base, tmp_path / "biased", biased)
    cfg = _json.loads((base / "config.json").read_text())
    experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg["num_local_experts"]
    ids = torch.randint(3, cfg["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    routed = Tail(base, ids, "cpu").routed
    assert routed and all(len(c) == experts and sum(c) == ids.numel() * cfg["num_experts_per_tok"]
                          for c in routed.values()), routed
    if arch == "glm4moe":
        assert all(c[3] == ids.numel() and c[7] == 0 for c in routed.values()), routed


def test_a_mean_kl_is_never_reported_below_zero():
    """KL ≥ 0, but the mean over positions of two near-equal float32 distributions can come out at -1e-9: plan's joint
    check printed "per-expert recipe KL -0.000000" on a DeepSeek-V3 with 256 experts. Every reported mean goes
    through numeric.kl_mean."""
    import torch

    from mpconvert.numeric import kl_mean, token_kl

    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(64, 1000, generator=g), -1)
    near = torch.log_softmax(base + 1e-7 * torch.randn(64, 1000, generator=g), -1)
    raw = float(token_kl(base, near).double().mean())
    assert abs(raw) < 1e-6 and kl_mean(raw) >= 0.0 and f"{round(kl_mean(raw), 6):.6f}" == "0.000000"
    assert kl_mean(-1e-9) == 0.0 and kl_mean(3.0, 2) == 1.5
