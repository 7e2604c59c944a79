"""Expert parallelism checked as SGLang splits, on a DeepSeek-V3-shaped job (bench/v3_shaped.py: MLA, 256 routed +
1 shared expert, V3's router bias; 5 layers here, the first 3 dense): experts go over the EP ranks whole and their
intermediate size over moe_tp = tp / ep, attention over all TP ranks."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import manifest_json

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("v3_shaped", ROOT / "bench" / "v3_shaped.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = tmp_path_factory.mktemp("v3")
    mod.main([str(d), "--layers", "5"])
    return d


def test_tp8_ep8_builds_and_verifies_with_no_false_findings(v3, cli):
    r = cli("build", v3 / "recipe.yaml", "-o", v3 / "ep8", "--tp", "8", "--ep", "8")
    assert r.exit_code == 0, r.output
    m = manifest_json(v3 / "ep8")
    assert (m["built_for_tp"], m["built_for_ep"]) == (8, 8)
    assert m["units"]["model.layers.4.mlp.experts"]["groups"][0]["experts"] == list(range(16))
    assert "e_score_correction_bias" in m["modules"]["model.layers.4.mlp.gate"]["tensors"]
    r = cli("verify", v3 / "ep8", "--tp", "8", "--ep", "8", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["findings"] == [], rep["counts"]


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
