"""The real SmolLM2-135M-Instruct (hidden 576, 9/3 heads, 30 layers) and its real quantizations: what random tiny
models cannot show — a kernel-shape rule that bites at TP=1, numeric bands that hold on outlier-heavy real layers and
still catch a decoding bug, and perplexity/KL on real text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import build_once, fails, manifest_json, refused, resign, set_scheme, write_recipe

EVAL_TEXT = ("GFDL-1.3", "Artistic")  # the GPTQ source was calibrated on GPL-3 and Apache-2.0 (fixtures/smollm2.py)


@pytest.fixture(scope="module")
def mixed(real, module_dir) -> Path:
    """Attention FP8 (per channel, dynamic), MLP GPTQ int4 g64: 5.27 bits per weight."""
    out = build_once(module_dir, real, {"fp8": "fp8-dynamic", "gptq": "gptq-g64"}, "gptq",
                     '- {match: "self_attn.*", source: fp8}', "real")
    text = out.parent / "eval.txt"
    text.write_text("\n\n".join(Path("/usr/share/common-licenses", n).read_text() for n in EVAL_TEXT))
    return out


def test_fp8_block_attention_of_576_is_refused_at_tp1(real, cli, tmp_path):
    """llm-compressor's FP8_BLOCK (128×128) output of the real model: its fused qkv (576, 192, 192) is not whole
    blocks, which SGLang refuses at load ('output_partition_size = 576 is not divisible by weight quantization
    block_n = 128') — build refuses it first, at TP=1. Its gate_up (K 576) SGLang loads, but the first forward fails
    quantizing activations in groups of 128 inputs (found on the GPU, docs/gpu-results.md §10): refused too. Its
    down_proj (K 1536) builds."""
    r = write_recipe(tmp_path, real, {"blk": "fp8-block", "int8": "w8a8"}, "blk", '- {match: "mlp.*", source: int8}')
    fails(cli, tmp_path, r, match="model.layers.0.self_attn.qkv_proj (fp8 block 128x128")
    r = write_recipe(tmp_path, real, {"blk": "fp8-block", "int8": "w8a8"}, "blk",
                     '- {match: "self_attn.*", source: int8}')
    fails(cli, tmp_path, r, match="model.layers.0.mlp.gate_up_proj (fp8 block 128x128 act=dynamic (ct) from 'blk' "
                                  "via default (blk)): input size 576 is not a multiple of the FP8 block 128")
    r = write_recipe(tmp_path, real, {"blk": "fp8-block", "int8": "w8a8"}, "int8",
                     '- {match: "mlp.down_proj", source: blk}')
    assert cli("build", r, "-o", tmp_path / "ok").exit_code == 0


@pytest.mark.parametrize("module,shape", [("self_attn.[qkv]_proj", "output size 960 and input size 576"),
                                          ("self_attn.o_proj", "output size 576 and input size 576")])
def test_gptq_attention_of_576_is_refused_for_marlin(real, cli, tmp_path, module, shape):
    """Found on the GPU (docs/gpu-results.md §10): SmolLM2's GPTQ qkv (N 960, K 576) loads in SGLang and its first
    forward fails — GPTQ-Marlin has no thread tile when neither N nor K is a multiple of 128. Build refuses it at TP=1;
    the MLP (gate_up 3072 × 576, down 576 × 1536) builds."""
    r = write_recipe(tmp_path, real, {"gptq": "gptq-g64", "int8": "w8a8"}, "int8",
                     f'- {{match: "{module}", layers: 3, source: gptq}}')
    text = fails(cli, tmp_path, r, match=shape)
    assert "Marlin has a thread tile for neither" in text and "layers.3.self_attn" in text
    r = write_recipe(tmp_path, real, {"gptq": "gptq-g64", "int8": "w8a8"}, "gptq",
                     '- {match: "self_attn.*", source: int8}')
    assert cli("build", r, "-o", tmp_path / "ok").exit_code == 0


def test_a_rule_for_the_lm_head_of_a_tied_model(real, cli, tmp_path):
    """SmolLM2 ties its output head to the embeddings: there is no lm_head to take from a source, and the error says
    so (it said 'it matches no module')."""
    r = write_recipe(tmp_path, real, {"gptq": "gptq-g64", "int8": "w8a8"}, "int8", '- {match: lm_head, source: gptq}')
    fails(cli, tmp_path, r, match="rules[0] (match 'lm_head' → gptq) selects nothing: the model has no lm_head of its "
                                  "own (it ties the output head to the embeddings); fix or remove the rule")


def test_build_and_inspect_say_what_each_rule_chose(real, cli, tmp_path):
    """A glob matches more than its writer may mean — `model.layers.1*` is layers 1 and 10-19 of the real model's 30
    — and nothing said so: build (text and --json) and inspect now list each rule's modules and layers."""
    r = write_recipe(tmp_path, real, {"fp8": "fp8-dynamic", "int8": "w8a8"}, "int8",
                     '- {match: "model.layers.1*", source: fp8}\n- {match: "mlp.down_proj", layers: 0-3, source: fp8}')
    first = {"chosen_by": "rules[0] (match 'model.layers.1*' → fp8)", "source": "fp8", "formats": ["fp8"],
             "modules": 11 * 7, "layers": "1,10-19"}
    res = cli("build", r, "-o", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    rules = json.loads(res.stdout)["rules"]
    assert rules == [first, {"chosen_by": "rules[1] (match 'mlp.down_proj' layers=0-3 → fp8)", "source": "fp8",
                             "formats": ["fp8"], "modules": 3, "layers": "0,2-3"},
                     {"chosen_by": "default (int8)", "source": "int8", "formats": ["int8"], "modules": 30 * 7 - 80,
                      "layers": "0,2-9,20-29"}]
    assert json.loads(cli("inspect", tmp_path / "out", "--json").stdout)["rules"] == rules
    text = cli("build", r, "-o", tmp_path / "out", "--force").output
    assert "  rules[0] (match 'model.layers.1*' → fp8): 77 linear modules in layers 1,10-19 (fp8)\n" in text
    assert "  default (int8): 130 linear modules in layers 0,2-9,20-29 (int8)\n" in text
    assert "rules[1] (match 'mlp.down_proj' layers=0-3 → fp8): 3 linear modules in layers 0,2-3" in \
        cli("inspect", tmp_path / "out", "--no-modules").output


def test_numeric_bands_hold_on_the_real_model(mixed, real, cli):
    """A correct GPTQ g64 checkpoint of the real model passes --numeric: its worst module (0.26 from the base, over a
    fixed 0.25 band) is measured against what round-to-nearest in its scheme does on the same weight. On held-out
    text the KL to the base and the perplexities are reported."""
    r = cli("verify", mixed, "--numeric", "--base", real["base"], "--text", mixed.parent / "eval.txt", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0, rep["findings"]
    n = rep["numeric"]
    print("real model:", n["module_error_max"], n["logits_cosine"], n["text"])
    assert n["module_error_max"]["gptq"]["error"] > 0.25  # the layer a fixed band failed
    assert n["module_error_max"]["gptq"]["ratio_to_rtn"] < 3.0
    t = n["text"]
    assert t["tokens"] > 4000 and 0 < t["kl"] < 0.5
    assert t["perplexity_base"] < t["perplexity"] < 2 * t["perplexity_base"]


def test_a_decoding_bug_still_fails_on_the_real_model(mixed, real, cli, tmp_path):
    """The same checkpoint with its GPTQ modules' zero convention mislabelled (v1 zeros read as v2: every value one
    quantization step off) — structurally consistent, re-signed — fails the numeric check on the real weights."""
    import shutil

    d = tmp_path / "bug"
    shutil.copytree(mixed, d)
    m = json.loads((d / "mpconvert_manifest.json").read_text())
    for name in ("model.layers.11.mlp.down_proj", "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"):
        set_scheme(m, name, checkpoint_format="gptq_v2")
    for unit in ("model.layers.11.mlp.down_proj", "model.layers.3.mlp.gate_up_proj"):
        m["units"][unit]["params"]["checkpoint_format"] = "gptq_v2"
    resign(d, m)
    r = cli("verify", d, "--numeric", "--base", real["base"], "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1
    flagged = {f["where"] for f in rep["findings"] if f["check"] == "numeric" and "weight error" in f["message"]}
    assert flagged >= {"model.layers.11.mlp.down_proj", "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"}


FIVE_SOURCES = {"fp8": "fp8-dynamic", "int8": "w8a8", "gptq": "gptq-g64", "w4": "ct-gptq-w4a16-g64",
                "w4a": "ct-w4a16-asym-g64"}
FIVE_RULES = """
- {match: "self_attn.*", source: fp8}
- {match: "mlp.*", layers: "0-7", source: int8}
- {match: "mlp.*", layers: "8-15", source: gptq}
- {match: "mlp.*", layers: "16-23", source: w4}
- {match: "mlp.*", layers: "24-29", source: w4a}
"""


@pytest.mark.parametrize("layout", ["mpconvert", "compressed-tensors"])
def test_new_formats_on_the_real_model(real, cli, tmp_path, layout):
    """Issue 17 on the real model: llm-compressor's W4A16 g64 (GPTQ) and W4A16 g64 with zero points beside FP8, Int8
    and gptqmodel's GPTQ — in the mpconvert layout and exported to compressed-tensors (the GPTQ layers repacked):
    verify's numeric bands hold, and SGLang (the export: without the plugin) binds every MLP to Marlin's WNA16 kernel.
    What this recipe serves on the GPU: docs/gpu-results.md §11 (tokens identical between the two layouts)."""
    out = tmp_path / "out"
    r = cli("build", write_recipe(tmp_path, real, FIVE_SOURCES, "w4", FIVE_RULES), "-o", out, "--to", layout)
    assert r.exit_code == 0, r.output
    r = cli("verify", out, "--numeric", "--base", real["base"], "--engine", "sglang", "--json")
    assert r.exit_code == 0, r.output
    manifest = manifest_json(out)
    formats = {n: m["format"] for n, m in manifest["modules"].items() if n.endswith("mlp.up_proj")}
    int4 = "gptq" if layout == "mpconvert" else "wna16"
    assert [formats[f"model.layers.{i}.mlp.up_proj"] for i in (0, 8, 16, 24)] == ["int8", int4, "wna16", "wna16"]
    assert manifest["modules"]["model.layers.24.mlp.up_proj"]["params"]["symmetric"] is False


def test_serving_values_go_at_launch_and_an_untied_head_is_refused(mixed, cli, tmp_path):
    """SmolLM2 ties its output head to the embeddings (the weights hold no lm_head). A longer context is the user's
    to choose when serving — SGLang's --json-model-override-args, which serve passes on and verify's edited-config
    finding points to — but `tie_word_embeddings: false` is not: SGLang would build a head of its own and leave it
    uninitialized. serve refuses that override; verify says it of a config.json edited so, and points to no override."""
    longer = '{"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}'
    r = cli("serve", mixed, "--print-command", "--", "--json-model-override-args", longer)
    assert r.exit_code == 0 and longer in r.stdout, r.output
    r = cli("serve", mixed, "--print-command", "--", "--json-model-override-args", '{"tie_word_embeddings": false}')
    refused(r, "config.json tie_word_embeddings=false, but the weights hold no lm_head")
    edited = tmp_path / "edited"
    edited.mkdir()
    for p in mixed.iterdir():
        (edited / p.name).symlink_to(p)
    config = json.loads((mixed / "config.json").read_text())
    for change, hint in (({"max_position_embeddings": 32768}, True), ({"tie_word_embeddings": False}, False)):
        (edited / "config.json").unlink()
        (edited / "config.json").write_text(json.dumps({**config, **change}, indent=2))
        r = cli("verify", edited, "--fast", "--json")
        assert r.exit_code == 1, r.output
        found = {f["where"]: f["message"] for f in json.loads(r.stdout)["findings"]}
        [key] = change
        assert "edited after build" in found[f"config.json {key}"]
        assert (f"--json-model-override-args '{{\"{key}\": …}}'" in found[f"config.json {key}"]) is hint
        assert ("as edited: config.json tie_word_embeddings=false, but the weights hold no lm_head" in
                found.get("config.json", "")) is not hint
