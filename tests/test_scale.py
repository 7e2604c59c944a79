"""Expert parallelism checked as SGLang splits, on a DeepSeek-V3-shaped job (bench/v3_shaped.py: MLA, 256 routed +
1 shared expert, V3's router bias; 5 layers here, the first 3 dense): experts go over the EP ranks whole and their
intermediate size over moe_tp = tp / ep, attention over all TP ranks (over tp / dp under DP attention)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import manifest_json, resign

ROOT = Path(__file__).resolve().parent.parent


def _generated(d: Path, *flags: str) -> Path:
    spec = importlib.util.spec_from_file_location("v3_shaped", ROOT / "bench" / "v3_shaped.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(d), "--layers", "5", *flags])
    return d


@pytest.fixture(scope="module")
def v3(module_dir) -> Path:
    return _generated(module_dir)


def test_the_mtp_layer_at_tp8_ep8(tmp_path, cli):
    """The real release's MTP layer (layer 5 here) is split as SGLang's NextN draft splits it — as a MoE layer of
    the model proper: its 256 experts over the EP ranks, attention over TP — and eh_proj stays whole and bf16."""
    d = _generated(tmp_path, "--mtp")
    r = cli("build", d / "recipe.yaml", "-o", d / "ep8", "--tp", "8", "--ep", "8")
    assert r.exit_code == 0, r.output
    m = manifest_json(d / "ep8")
    assert m["units"]["model.layers.5.mlp.experts"]["groups"][0]["experts"] == list(range(16))
    assert m["modules"]["model.layers.5.eh_proj"]["format"] == "unquantized"
    assert json.loads((d / "ep8" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    r = cli("verify", d / "ep8", "--tp", "8", "--ep", "8", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["findings"] == [], rep["counts"]
    # without EP its experts' intermediate size (128) splits into 16 per rank, as the model proper's do
    r = cli("verify", d / "ep8", "--tp", "8", "--json")
    where = {f["where"].split(" ")[0] for f in json.loads(r.stdout)["findings"]}
    assert r.exit_code == 1 and {"model.layers.3.mlp.experts", "model.layers.5.mlp.experts"} <= where, where


def test_tp8_ep8_builds_and_verifies_with_no_false_findings(v3, cli):
    r = cli("build", v3 / "recipe.yaml", "-o", v3 / "ep8", "--tp", "8", "--ep", "8")
    assert r.exit_code == 0, r.output
    m = manifest_json(v3 / "ep8")
    assert (m["built_for_tp"], m["built_for_ep"]) == (8, 8) and "built_for_dp" not in m  # written for --dp > 1 only
    assert m["units"]["model.layers.4.mlp.experts"]["groups"][0]["experts"] == list(range(16))
    assert "e_score_correction_bias" in m["modules"]["model.layers.4.mlp.gate"]["tensors"]
    r = cli("verify", v3 / "ep8", "--tp", "8", "--ep", "8", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["findings"] == [], rep["counts"]


def test_a_rule_per_layer_and_expert_range(v3, cli):
    """bench/v3_shaped.py's per-expert recipe (a rule per layer for attention, per layer and 16 experts for the routed
    ones): each rule looks at its own layers' modules only (planning with 976 rules took 35 s when each scanned every
    linear), with the first-match order and the module order unchanged."""
    r = cli("build", v3 / "recipe-per-expert.yaml", "-o", v3 / "per-expert", "--tp", "8", "--ep", "8")
    assert r.exit_code == 0, r.output
    m = manifest_json(v3 / "per-expert")
    for layer in range(3, 5):
        groups = {g["format"]: g["experts"] for g in m["units"][f"model.layers.{layer}.mlp.experts"]["groups"]}
        assert groups == {"fp8": [e for e in range(256) if e // 16 % 2], "gptq": [e for e in range(256)
                                                                             if not e // 16 % 2]}
        assert m["modules"][f"model.layers.{layer}.mlp.experts.17.up_proj"]["chosen_by"].startswith("rules[")
    for layer in range(5):  # the attention rule of each layer, kv_b_proj taken by the first rule
        attn = m["modules"][f"model.layers.{layer}.self_attn.o_proj"]
        assert attn["format"] == ("int8", "fp8")[layer % 2] and f"layers={layer}" in attn["chosen_by"]
        assert m["modules"][f"model.layers.{layer}.self_attn.kv_b_proj"]["chosen_by"].startswith("rules[0]")
    order = list(m["modules"])
    assert order == sorted(order, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    assert cli("verify", v3 / "per-expert", "--tp", "8", "--ep", "8").exit_code == 0


def test_rules_naming_modules_by_their_full_names(v3, cli, tmp_path):
    """Rules whose patterns begin `model.layers.N.` look only at the names beginning with their text up to the first
    wildcard (4,900 such rules took 100 s to plan when each scanned every linear): the wildcards after it (`*`, `?`,
    `[…]`) and first-match order must select exactly what a scan of every name would."""
    head = (v3 / "recipe.yaml").read_text().split("rules:")[0]
    rules = """rules:
  - {match: "self_attn.kv_b_proj", source: base}
  - {match: "self_attn.*", source: fp8}
  - {match: "mlp.shared_experts.*", source: int8}
  - {match: "lm_head", source: base}
  - {match: "mlp.*", moe: false, source: int8}
  - {match: "model.layers.4.mlp.experts.1?.*", source: int8}
  - {match: ["model.layers.4.mlp.experts.1*", "model.layers.3.mlp.experts.2[05].*"], source: fp8}
  - {match: "model.layers.3.mlp.experts.250.*", source: base}
"""
    recipe = tmp_path / "named.yaml"
    recipe.write_text(head.replace("base: ", f"base: {v3}/").replace("fp8: fp8", f"fp8: {v3}/fp8")
                      .replace("int8: int8", f"int8: {v3}/int8").replace("gptq: gptq", f"gptq: {v3}/gptq") + rules)
    r = cli("build", recipe, "-o", tmp_path / "out", "--tp", "8", "--ep", "8")
    assert r.exit_code == 0, r.output
    m = manifest_json(tmp_path / "out")

    def fmt(layer: int, e: int, proj: str = "up_proj") -> str:
        return m["modules"][f"model.layers.{layer}.mlp.experts.{e}.{proj}"]["format"]

    for e in range(256):
        want4 = "int8" if 10 <= e <= 19 else "fp8" if str(e).startswith("1") else "gptq"
        assert fmt(4, e) == want4, e
    assert [e for e in range(256) if fmt(3, e) == "fp8"] == [20, 25] == [e for e in range(256)
                                                                         if fmt(3, e, "down_proj") == "fp8"]
    assert fmt(3, 250, "gate_proj") == "unquantized" and fmt(3, 2) == "gptq"


def test_tp8_without_ep_is_refused_only_for_the_experts(v3, cli):
    """Without EP, SGLang splits every expert's intermediate size (128) over 8 ranks: 16 — not whole FP8 blocks of
    128, under GPTQ-Marlin's tile — refused naming the experts; attention (whole blocks per rank) and the dense layers
    are fine."""
    r = cli("build", v3 / "recipe.yaml", "-o", v3 / "tp8", "--tp", "8")
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "--tp 8: model.layers.3.mlp.experts (fp8 block 128x128" in text
    assert "expert intermediate size 16 (of [16, 16]) is not a multiple of the FP8 block 128" in text
    r = cli("verify", v3 / "ep8", "--tp", "8", "--json")  # the EP=8 build checked for TP=8 without EP
    rep = json.loads(r.stdout)
    # each MoE layer's two expert groups (FP8: 16 not whole blocks; GPTQ-Marlin: N = 2·16 under its tile), nothing
    # else
    assert r.exit_code == 1 and rep["counts"] == {"tp": 4}
    assert {f["where"] for f in rep["findings"]} == {"model.layers.3.mlp.experts", "model.layers.4.mlp.experts"}


def test_ep_must_divide_tp_and_the_experts(v3, cli):
    for args, match in [(["--tp", "8", "--ep", "3"], "--tp must be a multiple of --ep"),
                        (["--tp", "6", "--ep", "6"], "num_attention_heads=16 is not divisible by 6")]:
        r = cli("build", v3 / "recipe.yaml", "-o", v3 / "bad", *args)
        assert r.exit_code == 2 and match in " ".join(r.output.split()), r.output


def test_inspect_summarises_a_large_job_and_lists_on_request(v3, cli):
    """Thousands of module rows help no one by default: inspect prints their count and the totals; --modules lists
    them and --json always carries them."""
    if not (v3 / "ep8").exists():
        assert cli("build", v3 / "recipe.yaml", "-o", v3 / "ep8", "--tp", "8", "--ep", "8").exit_code == 0
    linears = [n for n, m in manifest_json(v3 / "ep8")["modules"].items() if m["kind"] == "linear"]
    assert len(linears) > 500
    r = cli("inspect", v3 / "ep8")
    assert r.exit_code == 0 and f"{len(linears):,} linear modules (pass --modules to list them)" in r.output
    assert "totals by format" in r.output and linears[-1] not in r.output
    r = cli("inspect", v3 / "ep8", "--modules")
    assert r.exit_code == 0 and "pass --modules" not in r.output and "linear modules" in r.output
    r = cli("inspect", v3 / "ep8", "--json")
    assert [m["name"] for m in json.loads(r.stdout)["modules"]] == linears
    assert json.loads(cli("inspect", v3 / "ep8", "--json", "--no-modules").stdout)["modules"] == []


def test_dp_attention_splits_only_attention_over_tp_over_dp(v3, cli):
    """SGLang's DP attention (--enable-dp-attention --dp N) splits attention over tp / N ranks and nothing else. At
    --tp 16 --ep 16 the FP8-block q_b_proj holds 192 outputs per rank, not whole 128-blocks: refused, suggesting --dp;
    with --dp 2 (8 attention ranks) it builds, records built_for_dp and verifies clean, while verify without --dp
    names attention only; --dp must divide --tp; the engine check runs without DP attention."""
    # the shared experts bf16 here: the tiny job's are 128 wide, 8 per rank at --tp 16 — under the K % 16 that
    # SGLang's int8 GEMM needs (the real V3's 2048 are 128 per rank)
    recipe = v3 / "recipe-dp.yaml"
    recipe.write_text((v3 / "recipe.yaml").read_text().replace('{match: "mlp.shared_experts.*", source: int8}',
                                                               '{match: "mlp.shared_experts.*", source: base}'))
    assert recipe.read_text() != (v3 / "recipe.yaml").read_text()
    r = cli("build", recipe, "-o", v3 / "tp16", "--tp", "16", "--ep", "16")
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "--tp 16 --ep 16: model.layers.0.self_attn.q_b_proj (fp8 block 128x128" in text
    assert "output part per rank 192" in text and "use a smaller --tp, DP attention (--dp) or another" in text
    r = cli("build", recipe, "-o", v3 / "dp2", "--tp", "16", "--ep", "16", "--dp", "2")
    assert r.exit_code == 0, r.output
    m = manifest_json(v3 / "dp2")
    assert (m["built_for_tp"], m["built_for_ep"], m["built_for_dp"]) == (16, 16, 2)
    r = cli("verify", v3 / "dp2", "--tp", "16", "--ep", "16", "--dp", "2", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["findings"] == [] and rep["memory"]["dp"] == 2, rep["counts"]
    # --enable-dp-lm-head: the lm_head over the 8 attention ranks instead of 16 — bytes per rank only
    r = cli("verify", v3 / "dp2", "--tp", "16", "--ep", "16", "--dp", "2", "--enable-dp-lm-head", "--json", "--fast")
    head = json.loads(r.stdout)
    assert r.exit_code == 0 and head["findings"] == [] and head["memory"]["dp_lm_head"] is True
    lm_head = next(t["bytes"] for t in json.loads(cli("inspect", v3 / "dp2", "--json").stdout)["modules"]
                   if t["name"] == "lm_head")
    assert head["memory"]["bytes_per_rank"] - rep["memory"]["bytes_per_rank"] == pytest.approx(lm_head / 16, abs=8)
    r = cli("verify", v3 / "dp2", "--tp", "16", "--ep", "16", "--enable-dp-lm-head")
    assert r.exit_code == 2 and "--enable-dp-lm-head splits the lm_head over the attention group" in r.output
    r = cli("verify", v3 / "dp2", "--tp", "16", "--ep", "16", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and set(rep["counts"]) == {"tp"}
    assert {f["where"].split(".self_attn.")[1] for f in rep["findings"]} == {"q_b_proj"}
    # a manifest whose claim the rules refuse: built_for_dp edited away (re-signed), verified at the sizes it was built
    # for — the claim itself is a finding
    m = json.loads((v3 / "dp2" / "mpconvert_manifest.json").read_text())
    del m["built_for_dp"]
    resign(v3 / "dp2", m)
    r = cli("verify", v3 / "dp2", "--tp", "16", "--ep", "16", "--dp", "2", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and set(rep["counts"]) == {"manifest"}
    assert all(f["message"].startswith("built_for_tp=16 built_for_ep=16, but --tp 16 --ep 16:")
               for f in rep["findings"]) and "q_b_proj" in rep["findings"][0]["where"]
    for args, match in [(["--tp", "16", "--ep", "16", "--dp", "3"], "--tp must be a multiple of --dp"),
                        (["--tp", "8", "--dp", "0"], "--tp, --ep and --dp must be between 1 and 4096")]:
        r = cli("build", v3 / "recipe.yaml", "-o", v3 / "bad", *args)
        assert r.exit_code == 2 and match in " ".join(r.output.split()), r.output
    r = cli("verify", v3 / "dp2", "--engine", "sglang", "--tp", "2", "--dp", "2")
    assert r.exit_code == 2 and "--engine sglang loads the model without DP attention" in " ".join(r.output.split())


def test_dp_attention_is_refused_where_sglang_has_none(llama, cli, tmp_path):
    """SGLang 0.5.17's Llama splits attention over every TP rank whatever --dp says: --dp there is refused, not
    silently checked for a split SGLang would not make."""
    from helpers import write_recipe

    r = cli("build", write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq"), "-o", tmp_path / "out", "--tp", "2",
            "--dp", "2")
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "SGLang 0.5.17's llama model has no DP attention" in text and "drop --dp" in text


def test_dp_attention_rule_is_sglangs():
    """The split and the model list come from SGLang itself: attention's TP size is what SGLang's
    compute_dp_attention_world_info gives every rank, and a model type is in DP_ATTENTION_MODEL_TYPES exactly when
    SGLang's model file for it builds attention with attn_tp_size."""
    from sglang.srt.layers.dp_attention import compute_dp_attention_world_info

    from mpconvert.rules import DP_ATTENTION_MODEL_TYPES

    for tp, dp in [(8, 1), (8, 2), (8, 8), (16, 2), (16, 4), (32, 32)]:
        assert {compute_dp_attention_world_info(dp > 1, rank, tp, dp)[1] for rank in range(tp)} == {tp // dp}
    source = {"deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v2", "qwen2_moe": "qwen2_moe", "qwen3": "qwen3",
              "qwen3_moe": "qwen3_moe", "llama": "llama", "qwen2": "qwen2", "mixtral": "mixtral"}
    for model_type, module in source.items():
        reads = "attn_tp_size" in Path(importlib.util.find_spec(f"sglang.srt.models.{module}").origin).read_text()
        assert reads == (model_type in DP_ATTENTION_MODEL_TYPES), model_type


def test_plan_chooses_among_the_sources_dp_attention_allows(v3):
    """`plan --dp` offers what `build --dp` accepts: FP8-block attention can serve q_b_proj at --tp 16 --ep 16 only
    under DP attention (8 attention ranks), and the experts' candidates do not change with --dp."""
    from mpconvert.choose import candidates
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe
    from mpconvert.rules import Parallel

    inputs = Inputs.open(load_recipe(v3 / "recipe.yaml"))
    without, with_dp = candidates(inputs, Parallel(16, 16)), candidates(inputs, Parallel(16, 16, dp=2))
    q_b = "model.layers.0.self_attn.q_b_proj"
    assert "fp8" not in {s.source for s in without.units[q_b]} and "fp8" in {s.source for s in with_dp.units[q_b]}
    experts = [u for u in without.units if ".mlp.experts." in u]
    assert experts and all({s.source for s in without.units[u]} == {s.source for s in with_dp.units[u]}
                           for u in experts)


def test_moe_dense_tp_size_1_keeps_deepseeks_dense_mlps_whole():
    """SGLang's --moe-dense-tp-size 1 (models/deepseek_v2.py) builds DeepSeek's dense MLP layers whole on every rank:
    a split that fails at --tp is no problem there. The shared experts, attention and the routed experts keep their
    splits, and models without the rule (Llama) ignore the flag."""
    from mpconvert.formats import Scheme
    from mpconvert.layout import ModelInfo, role_of
    from mpconvert.rules import Linear, Parallel, partition_problems

    gptq = Scheme.of("gptq", bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq")

    def mlp(prefix):  # gate/up 256 × 1024, down 1024 × 256: down's 256 inputs over 4 ranks are 64, half a group
        return [Linear(f"{prefix}.{p}_proj", role_of(f"{prefix}.{p}_proj"), gptq, "g", "x", o, i)
                for p, o, i in (("gate", 256, 1024), ("up", 256, 1024), ("down", 1024, 256))]

    v3 = ModelInfo("deepseek_v3", 5, 16, 16, 256)
    dense, shared = mlp("model.layers.0.mlp"), mlp("model.layers.3.mlp.shared_experts")
    assert {p.where for p in partition_problems(dense + shared, v3, Parallel(4))} == {
        "model.layers.0.mlp.down_proj", "model.layers.3.mlp.shared_experts.down_proj"}
    [p] = partition_problems(dense + shared, v3, Parallel(4, dense_tp=1))
    assert p.where == "model.layers.3.mlp.shared_experts.down_proj" and "--moe-dense-tp-size 1" in p.message
    assert partition_problems(dense, v3, Parallel(4, dense_tp=4)) != []  # the --tp size: split as without the flag
    llama = ModelInfo("llama", 5, 16, 16, 0)
    assert partition_problems(dense, llama, Parallel(4, dense_tp=1)) != []


def test_moe_dense_tp_size_through_build_and_verify(v3, cli):
    """--moe-dense-tp-size on the V3-shaped job: recorded by build, checked by verify, the dense MLPs counted whole on
    every rank in the memory report; a size SGLang refuses is a usage error, and the engine check runs without it."""
    r = cli("build", v3 / "recipe.yaml", "-o", v3 / "dense1", "--tp", "8", "--ep", "8", "--moe-dense-tp-size", "1")
    assert r.exit_code == 0, r.output
    m = manifest_json(v3 / "dense1")
    assert m["built_for_moe_dense_tp"] == 1 and "built_for_dp" not in m
    r = cli("verify", v3 / "dense1", "--tp", "8", "--ep", "8", "--moe-dense-tp-size", "1", "--json", "--fast")
    whole = json.loads(r.stdout)
    assert r.exit_code == 0 and whole["findings"] == [] and whole["memory"]["moe_dense_tp"] == 1, whole["counts"]
    r = cli("verify", v3 / "dense1", "--tp", "8", "--ep", "8", "--json", "--fast")
    split = json.loads(r.stdout)
    assert r.exit_code == 0 and "moe_dense_tp" not in split["memory"]
    dense_mlp = sum(t["bytes"] for t in json.loads(cli("inspect", v3 / "dense1", "--json").stdout)["modules"]
                    if ".mlp." in t["name"] and int(t["name"].split(".")[2]) < 3)
    assert whole["memory"]["bytes_per_rank"] - split["memory"]["bytes_per_rank"] == pytest.approx(
        dense_mlp * 7 / 8, abs=8)  # whole on each of 8 ranks instead of an eighth
    for args, match in [(["--tp", "8", "--moe-dense-tp-size", "2"], "takes only 1 or the --tp size (8)"),
                        (["--tp", "2", "--moe-dense-tp-size", "1", "--engine", "sglang"],
                         "without DP attention or --moe-dense-tp-size")]:
        r = cli("verify", v3 / "dense1", *args)
        assert r.exit_code == 2 and match in " ".join(r.output.split()), r.output
    # a manifest claiming sizes SGLang refuses (re-signed, so only the claim is wrong): one manifest finding naming
    # the claim and SGLang's rule, not a split silently checked as if the flag were absent
    m = json.loads((v3 / "dense1" / "mpconvert_manifest.json").read_text())
    m["built_for_moe_dense_tp"] = 3
    resign(v3 / "dense1", m)
    r = cli("verify", v3 / "dense1", "--tp", "8", "--ep", "8", "--moe-dense-tp-size", "1", "--json", "--fast")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and [(f["check"], f["where"]) for f in rep["findings"]] == [
        ("manifest", "mpconvert_manifest.json")]
    assert rep["findings"][0]["message"].startswith("built_for_tp=8 built_for_ep=8 built_for_moe_dense_tp=3: "
                                                    "--moe-dense-tp-size 3: SGLang 0.5.17 takes only 1 or the --tp")
