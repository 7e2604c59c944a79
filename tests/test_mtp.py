"""DeepSeek-V3's multi-token-prediction (MTP) layer: built by the recipe like any layer, its NextN-only modules kept
unquantized, bound by the shim in SGLang's own NextN draft model, or dropped on request — and every way a user's
checkpoints can disagree about it refused with the fix.

No quantizer here writes an MTP layer (transformers drops it on load), so the sources are the real quantizer outputs
of the tiny DeepSeek fixture made into DeepSeek-V3 checkpoints as the official release lays them out: layer N (=
num_hidden_layers) holds a decoder layer — here the last MoE layer's tensors, bytes as the quantizer wrote them — and
enorm, hnorm, eh_proj, shared_head.{norm,head} and embed_tokens in bf16.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.mtp import with_mtp_layer
from helpers import build, fails, refused, write_recipe
from mpconvert.checkpoint import Checkpoint
from mpconvert.engine import run_ranks
from mpconvert.layout import config_problems

MTP_ONLY = ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens")


@pytest.fixture(scope="module")
def v3(deepseek, module_dir) -> dict[str, Path]:
    """Every DeepSeek fixture kind as a V3 checkpoint with an MTP layer; "<kind>-no-mtp" without it; "fp8-eh" with
    an FP8 eh_proj."""
    root = module_dir
    out = {kind: with_mtp_layer(path, root / kind) for kind, path in deepseek.items()}
    for kind in ("base", "gptq"):
        out[f"{kind}-no-mtp"] = with_mtp_layer(deepseek[kind], root / f"{kind}-no-mtp", drop_mtp=True)
    out["fp8-eh"] = with_mtp_layer(deepseek["ct-fp8-block"], root / "fp8-eh", fp8_eh_proj=True)
    return out


SOURCES = {"fp8": "ct-fp8-block", "int8": "ct-w8a8", "gptq": "gptq"}
RULES = """
- {match: "self_attn.kv_b_proj", source: base}
- {match: "self_attn.*", source: fp8}
- {match: "mlp.shared_experts.*", source: int8}
"""  # the routed experts GPTQ (so fp16): kv_b_proj stays bf16 (rules.dtype_problems)


def test_the_mtp_layer_is_built_by_the_rules_and_bound_in_sglangs_nextn_draft(v3, cli, tmp_path):
    out = tmp_path / "out"
    m = build(cli, write_recipe(tmp_path, v3, SOURCES, "gptq", RULES), out)
    layer = {n: mod for n, mod in m["modules"].items() if n.startswith("model.layers.2.")}
    assert {n.split(".", 3)[3] for n in layer} >= {*(f"{s}" for s in MTP_ONLY), "self_attn.q_a_proj"}
    assert layer["model.layers.2.self_attn.q_a_proj"]["format"] == "fp8"
    assert layer["model.layers.2.mlp.shared_experts.down_proj"]["format"] == "int8"
    assert layer["model.layers.2.mlp.experts.7.up_proj"]["format"] == "gptq"
    assert layer["model.layers.2.eh_proj"]["format"] == "unquantized"
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    r = cli("verify", out, "--json")
    assert r.exit_code == 0, r.output
    # the memory SGLang holds without speculative decoding is the rest
    t = m["tensors"]
    mtp_bytes = sum(Checkpoint.open(out, "out").tensors[n].nbytes for n in t["name"] if n.startswith("model.layers.2."))
    assert json.loads(r.stdout)["memory"]["mtp_bytes"] == mtp_bytes > 0
    # SGLang's own classes on CPU: the model proper skips layer 2; the NextN draft (what --speculative-algorithm
    # NEXTN builds from the same directory) loads it, each of its layers bound to its format's native method
    (res,) = run_ranks(out, 1, "float16")
    assert res.get("error") is None and res["draft"] == "DeepseekV3ForCausalLMNextN", res.get("error")
    methods = res["methods"]
    # layer 2 is layer 1's tensors with layer 1's formats: each of its layers bound as layer 1's is
    in_layer = {n.split(".", 3)[3]: m for n, m in methods.items() if n.startswith("model.layers.1.")}
    assert len(in_layer) >= 6
    assert {n: m for n, m in methods.items() if n.startswith("model.layers.2.")} == \
        {f"model.layers.2.{n}": m for n, m in in_layer.items()}
    assert methods["model.layers.2.self_attn.fused_qkv_a_proj_with_mqa"][0] == "CompressedTensorsLinearMethod"
    assert "GPTQ" in methods["model.layers.2.mlp.experts"][0]
    assert res["untouched"] == []
    eh = res["params"]["model.layers.2.eh_proj.weight"]
    want = load_file(out / "model-00001-of-00001.safetensors")["model.layers.2.eh_proj.weight"].to(torch.float16)
    assert eh[:2] == ["torch.float16", [256, 512]]  # a plain Linear in the model's dtype, its weight loaded
    assert eh[2] == hashlib.sha256(want.view(torch.uint8).numpy().tobytes()).hexdigest()
    r = cli("verify", out, "--engine", "sglang", "--dtype", "float16", "--tp", "2", "--ep", "2")
    assert r.exit_code == 0, r.output


def test_experts_mixed_inside_the_mtp_layer(v3, cli, tmp_path):
    # experts 0-3 FP8 and the rest GPTQ in every MoE layer, the MTP layer's among them: the draft's FusedMoE gets the
    # shim's per-group method as the model proper's does
    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, v3, SOURCES, "gptq", RULES + "- {match: 'mlp.experts.*', experts: '0-3', "
                                                                   "source: fp8}\n"), out)
    (res,) = run_ranks(out, 1, "float16")
    assert res.get("error") is None and res["draft"] == "DeepseekV3ForCausalLMNextN", res.get("error")
    for layer in (1, 2):
        assert res["methods"][f"model.layers.{layer}.mlp.experts"][0] == "MixedExpertsMethod"
    assert res["untouched"] == []
    r = cli("verify", out, "--engine", "sglang", "--dtype", "float16")
    assert r.exit_code == 0, r.output


def test_eh_proj_stays_unquantized(v3, cli, tmp_path):
    # SGLang's NextN builds eh_proj as a plain torch Linear: an FP8 one would be loaded as bf16 numbers, unscaled
    rules = RULES + "- {match: eh_proj, source: fp8}\n"
    text = fails(cli, tmp_path, write_recipe(tmp_path, v3, {**SOURCES, "fp8": "fp8-eh"}, "gptq", rules),
                 match="model.layers.2.eh_proj is fp8")
    assert "plain torch Linear with no quant method — take it unquantized" in text
    # the same source's bf16 eh_proj (the fp8 fixture without the edit) builds
    m = build(cli, write_recipe(tmp_path, v3, SOURCES, "gptq", rules), tmp_path / "ok")
    assert m["modules"]["model.layers.2.eh_proj"]["source"] == "fp8"


def test_a_source_without_the_mtp_layer(v3, cli, tmp_path):
    sources = {**SOURCES, "gptq": "gptq-no-mtp"}
    text = fails(cli, tmp_path, write_recipe(tmp_path, v3, sources, "gptq", RULES),
                 match="source 'gptq' has no module model.layers.2.")
    assert "lacks the multi-token-prediction (MTP) layer 2" in text and "`mtp: drop`" in text
    # the fix it names: the layer from a source that has it …
    m = build(cli, write_recipe(tmp_path, v3, sources, "gptq", RULES + "- {match: '*', layers: 2, source: fp8}\n"),
              tmp_path / "from-fp8")
    assert m["modules"]["model.layers.2.mlp.experts.0.gate_proj"]["source"] == "fp8"
    # … or no MTP layer: none written, and config.json says so (SGLang's NextN then refuses rather than drafting
    # with uninitialized weights)
    out = tmp_path / "dropped"
    m = build(cli, write_recipe(tmp_path, v3, sources, "gptq", RULES, extra="mtp: drop"), out)
    assert not [n for n in m["tensors"]["name"] if n.startswith("model.layers.2.")]
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert cli("verify", out).exit_code == 0


def test_a_base_without_the_mtp_layer(v3, cli, tmp_path):
    fixtures = {**v3, "base": v3["base-no-mtp"]}
    text = fails(cli, tmp_path, write_recipe(tmp_path, fixtures, SOURCES, "gptq", RULES),
                 match="source 'fp8' holds the multi-token-prediction (MTP) layer 2, which the base lacks")
    assert "add `mtp: drop`" in text
    out = tmp_path / "dropped"
    build(cli, write_recipe(tmp_path, fixtures, SOURCES, "gptq", RULES, extra="mtp: drop"), out)
    # the base announced an MTP layer it does not hold; the output says what it holds
    assert json.loads((fixtures["base"] / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert cli("verify", out).exit_code == 0


def test_a_routing_file_has_no_counts_for_the_mtp_layer(v3, cli, tmp_path):
    (tmp_path / "routing.json").write_text(json.dumps({"1": [8, 7, 6, 5, 4, 3, 2, 1]}))
    rule = RULES + "- {match: 'mlp.experts.*', experts: {file: routing.json, top: 2}, source: fp8}\n"
    text = fails(cli, tmp_path, write_recipe(tmp_path, v3, SOURCES, "gptq", rule),
                 match="the routing file has no counts for the multi-token-prediction (MTP) layer 2")
    assert "`layers: 0-1`" in text
    m = build(cli, write_recipe(tmp_path, v3, SOURCES, "gptq", rule.replace("top: 2}", "top: 2}, layers: 0-1")),
              tmp_path / "ok")
    assert m["modules"]["model.layers.1.mlp.experts.0.gate_proj"]["format"] == "fp8"
    assert m["modules"]["model.layers.2.mlp.experts.0.gate_proj"]["format"] == "gptq"


def test_mtp_modules_where_they_cannot_be(v3, cli, tmp_path):
    # an MTP-only module in one of the model's own layers: SGLang's loader has no parameter for it
    base = shutil.copytree(v3["base"], tmp_path / "base")
    t = load_file(base / "model.safetensors")
    t["model.layers.0.enorm.weight"] = t["model.layers.2.enorm.weight"].clone()
    save_file(t, base / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path, {**v3, "base": base}, SOURCES, "base")
    fails(cli, tmp_path, recipe, match="model.layers.0.enorm is a multi-token-prediction module in layer 0")
    # a built directory must hold the MTP layers its config.json announces (a base may announce one it lacks)
    cfg = json.loads((v3["base-no-mtp"] / "config.json").read_text())
    shapes = {f"model.layers.{i}.self_attn.o_proj": (256, 256) for i in (0, 1)}
    assert config_problems(cfg, shapes) == []
    (problem,) = config_problems(cfg, shapes, served=True)
    assert "num_nextn_predict_layers=1, but the weights hold 0 multi-token-prediction layer(s)" in problem
    # a one-layer model: SGLang's NextN would read layer 0 as the MTP layer
    one = {**cfg, "num_hidden_layers": 1}
    assert any("reads layer 0 as its MTP layer" in p
               for p in config_problems(one, {"model.layers.1.enorm": (256,), "model.layers.0.self_attn.o_proj":
                                              (256, 256)}))


def test_refused_recipe_value(v3, cli, tmp_path):
    r = cli("build", write_recipe(tmp_path, v3, SOURCES, "gptq", extra="mtp: maybe"), "-o", tmp_path / "o")
    refused(r, "mtp")


def test_plan_measures_the_model_proper_and_drops_the_mtp_layer(v3, cli, tmp_path):
    # next-token KL cannot see a layer that serves speculative decoding only: plan's recipe says so, and builds at
    # exactly the bytes plan reported
    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {v3['base']}\nsources: {{fp8: {v3['ct-fp8-block']}, int8: {v3['ct-w8a8']}}}\n")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 1000 + 3}" for i in range(2000)))
    r = cli("plan", src, "--budget", "0.6x", "--calib", calib, "-o", tmp_path / "r.yaml", "--calib-tokens", 256,
            "--json")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "r.yaml").read_text()
    assert "\nmtp: drop   # MTP layer 2: speculative decoding only" in text
    out = tmp_path / "out"
    m = build(cli, tmp_path / "r.yaml", out)
    assert not [n for n in m["tensors"]["name"] if n.startswith("model.layers.2.")]
    assert m["totals"]["bytes"] == json.loads(r.stdout)["reports"][0]["bytes"]
