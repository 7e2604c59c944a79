"""Formats out (issue 17): build --to compressed-tensors — an ordinary compressed-tensors checkpoint that SGLang
(with the mpconvert plugin switched off) and compressed-tensors' own loader read, every module exactly its source's.
"""
from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import match_name

from helpers import build, check_faithful, fails, load, manifest_json, refused, write_recipe
from mpconvert.engine import run_ranks
from mpconvert.numeric import dequantize
from mpconvert.sources import open_source

CT = ("--to", "compressed-tensors")
DENSE = {"awq": "awq", "gptq": "gptq", "nfp8": "native-fp8-block", "int8": "native-w8a8", "w4": "ct-w4a16",
         "ga": "gptq-asym"}
DENSE_RULES = """
- {match: "*_proj", layers: 0, source: awq}
- {match: "self_attn.*", layers: 1, source: nfp8}
- {match: "mlp.down_proj", layers: 1, source: int8}
- {match: "mlp.*", layers: 1, source: gptq}
"""
MOE = {"w4": "ct-w4a16", "fp8": "ct-fp8-block", "int8": "ct-w8a8", "gptq": "gptq"}
MOE_RULES = """
- {match: "mlp.experts.*", layers: 0, source: fp8}
- {match: "self_attn.*", layers: 0, source: int8}
- {match: "self_attn.*", layers: 1, source: gptq}
"""


@pytest.fixture(scope="module")
def dense_ct(llama, module_dir):
    from typer.testing import CliRunner

    from mpconvert.cli.main import app

    d = module_dir
    recipe = write_recipe(d, llama, DENSE, "w4", DENSE_RULES)
    r = CliRunner().invoke(app, ["build", str(recipe), "-o", str(d / "out"), *CT, "--tp", "2"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return d / "out", manifest_json(d / "out")


def _sources(fixtures, names: dict, model_type: str) -> dict:
    return {label: open_source(label, fixtures[kind], model_type) for label, kind in names.items()}


def test_dense_export_is_a_compressed_tensors_checkpoint(dense_ct, llama):
    out, manifest = dense_ct
    assert manifest["layout"] == "compressed-tensors"
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "mixed-precision"
    QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema takes it
    assert "mpconvert" not in json.dumps(qc)  # nothing in it names the plugin
    assert config["mpconvert"]["manifest"] == "mpconvert_manifest.json"
    assert qc["ignore"] == ["lm_head"]
    by_format = {g["format"] for g in qc["config_groups"].values()}
    assert by_format == {"pack-quantized", "float-quantized", "int-quantized"}
    modules = manifest["modules"]
    assert modules["model.layers.0.self_attn.q_proj"]["params"]["repacked_from"] == "awq"
    assert modules["model.layers.1.mlp.gate_proj"]["params"] == {"bits": 4, "group_size": 128, "repacked_from": "gptq",
                                                                 "strategy": "group", "symmetric": True}
    fp8 = modules["model.layers.1.self_attn.q_proj"]
    assert fp8["params"]["layout"] == "ct" and fp8["tensors"]["weight_scale"]["renamed_from"] == "weight_scale_inv"
    assert modules["model.layers.1.mlp.down_proj"]["params"]["layout"] == "ct"
    check_faithful(out, manifest, llama, DENSE, "llama")


def test_compressed_tensors_own_loader_decompresses_every_module_exactly(dense_ct, llama):
    """transformers + compressed-tensors (run_compressed=False) load the export and decompress each module; in
    float32 (every stored scale dtype is exact there) each equals the source module's reference dequantization."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out, manifest = dense_ct
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(
        run_compressed=False), dtype=torch.float32)
    modules = dict(model.named_modules())
    srcs = _sources(llama, DENSE, "llama")
    n = 0
    for name, m in manifest["modules"].items():
        if m["kind"] != "linear" or m["format"] == "unquantized":
            continue
        view = srcs[m["source"]].modules[name]
        want = dequantize(view.scheme, view.tensors, *m["shape"])
        assert torch.equal(modules[name].weight.data, want), f"{name} ({m['source']})"
        n += 1
    assert n == 14


def test_stock_sglang_loads_the_export_with_the_plugin_off(dense_ct):
    out, _ = dense_ct
    for tp in (1, 2):
        ranks = run_ranks(out, tp, "auto", shim=False)
        for r in ranks:
            assert "error" not in r, r.get("error")
            assert r["quant_config"] == "CompressedTensorsConfig" and r["untouched"] == []
            m = r["methods"]
            assert m["model.layers.0.self_attn.qkv_proj"] == ["CompressedTensorsLinearMethod",
                                                              "CompressedTensorsWNA16"]
            assert m["model.layers.1.self_attn.qkv_proj"] == ["CompressedTensorsLinearMethod",
                                                              "CompressedTensorsW8A8Fp8"]
            assert m["model.layers.1.mlp.down_proj"] == ["CompressedTensorsLinearMethod", "CompressedTensorsW8A8Int8"]
            assert m["model.layers.1.mlp.gate_up_proj"][1] == "CompressedTensorsWNA16"
            assert m["lm_head"][0] == "UnquantizedEmbeddingMethod"


MISREAD = """
import json, sys
import mpconvert.runtime_shim.engine_check as ec
import dataclasses
import mpconvert.runtime_shim.sglang_versions as versions
init_rank = versions.init_rank


def launched(server_args, *a):  # the server args engine_check made, with the launch flag set
    try:
        server_args.quantization = sys.argv[2]  # 0.5.23: a struct, settable until published
    except AttributeError:  # 0.5.17: read-only once resolved; a copy made with it
        server_args = dataclasses.replace(server_args, quantization=sys.argv[2])
    return init_rank(server_args, *a)


versions.init_rank = launched
ec.scaffold()
r = ec.build_and_load(sys.argv[1], sys.argv[3], 1, 0)
print("RESULT " + json.dumps({k: r[k] for k in ("quant_config", "methods", "params", "untouched")}))
"""


def test_a_quantization_flag_that_would_misread_the_export_is_refused(llama, cli, tmp_path):
    """SGLang keeps --quantization w8a8_int8 over a compressed-tensors checkpoint (it counts the two compatible) and
    reads every layer with it: the FP8 layers' bytes load into Int8 parameters, with no error and no parameter left
    unwritten — shown with SGLang's own loader on CPU. serve refuses every method but the directory's own."""
    import subprocess
    import sys

    from mpconvert.engine import rendezvous

    recipe = write_recipe(tmp_path, llama, {"int8": "ct-w8a8", "fp8": "ct-fp8-dynamic"}, "int8",
                          '- {match: "mlp.*", source: fp8}\n')
    build(cli, recipe, tmp_path / "out", *CT)
    p = subprocess.run([sys.executable, "-c", MISREAD, str(tmp_path / "out"), "w8a8_int8", rendezvous(tmp_path)],
                       capture_output=True, text=True)
    [line] = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")] or [p.stderr[-2000:]]
    misread = json.loads(line[7:])
    assert misread["quant_config"] == "W8A8Int8Config" and misread["untouched"] == []
    assert misread["methods"]["model.layers.0.mlp.gate_up_proj"][0] == "W8A8Int8LinearMethod"
    assert misread["params"]["model.layers.0.mlp.gate_up_proj.weight"][0] == "torch.int8"  # FP8 bytes, cast
    assert load(tmp_path / "out")["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn
    for flag in ("w8a8_int8", "w8a8_fp8", "fp8"):
        refused(cli("serve", tmp_path / "out", "--print-command", "--", "--quantization", flag),
                f"--quantization {flag}: {tmp_path / 'out'}/config.json says how each layer is stored (quant_method "
                f"'compressed-tensors')")
    r = cli("serve", tmp_path / "out", "--print-command", "--", "--quantization", "compressed-tensors")
    assert r.exit_code == 0 and r.stdout.split()[-2:] == ["--quantization", "compressed-tensors"], r.output


def test_verify_checks_an_export_and_catches_an_edited_config(dense_ct, llama, cli, tmp_path):
    out, _ = dense_ct
    r = cli("verify", out, "--numeric", "--base", llama["base"], "--engine", "sglang", "--tp", "2")
    assert r.exit_code == 0, r.output
    edited = tmp_path / "edited"
    import shutil

    shutil.copytree(out, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = True
    (edited / "config.json").write_text(json.dumps(cfg))
    r = cli("verify", edited, "--fast", "--json")
    findings = json.loads(r.stdout)["findings"]
    assert r.exit_code == 1 and [f["where"] for f in findings] == [
        "config.json quantization_config.config_groups.group_0.weights.symmetric"], findings


def test_moe_per_layer_export(moe, cli, tmp_path):
    """A per-layer MoE mix: FP8-block experts in one layer, pack-quantized in the other. SGLang without the plugin
    binds each FusedMoE layer natively; compressed-tensors' own matching and decompression give every expert
    exactly its source's weight (transformers 5 fuses Qwen3-MoE experts, so each module is decompressed as
    compressed-tensors' loader would: scheme by its own target matching, its format's compressor)."""
    out = tmp_path / "out"
    manifest = build(cli, write_recipe(tmp_path, moe, MOE, "w4", MOE_RULES), out, *CT, "--tp", "2")
    check_faithful(out, manifest, moe, MOE, "qwen3_moe")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"  # SGLang 0.5.17's WNA16 MoE checks the top-level format
    config = QuantizationConfig.model_validate(qc)
    tensors, srcs = load(out), _sources(moe, MOE, "qwen3_moe")
    for name, m in manifest["modules"].items():
        if m["kind"] != "linear":
            continue
        matched = [g for g in config.config_groups.values() if any(match_name(name, t) for t in g.targets)]
        if any(match_name(name, t) for t in config.ignore):
            assert m["format"] == "unquantized", name
            continue
        scheme = matched[0]
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        got = BaseCompressor.get_value_from_registry(scheme.format).decompress(state, scheme)["weight"]
        view = srcs[m["source"]].modules[name]
        want = dequantize(view.scheme, view.tensors, *m["shape"])
        assert torch.equal(want.to(got.dtype), got), name
    for r in run_ranks(out, 2, "auto", shim=False):
        assert "error" not in r, r.get("error")
        assert r["methods"]["model.layers.0.mlp.experts"] == ["CompressedTensorsFusedMoEMethod",
                                                               "CompressedTensorsW8A8Fp8MoE"]
        assert r["methods"]["model.layers.1.mlp.experts"] == ["CompressedTensorsFusedMoEMethod",
                                                               "CompressedTensorsWNA16MoE"]
        assert r["untouched"] == []


@pytest.mark.parametrize("sources,default,rules,match", [
    ({"fp8": "ct-fp8-block", "gptq": "gptq"}, "gptq", '- {match: "mlp.experts.*", experts: "0-3", source: fp8}',
     "mixes formats across its experts"),
    ({"int8": "ct-w8a8", "gptq": "gptq"}, "gptq", '- {match: "mlp.experts.*", layers: 0, source: int8}',
     "int8 experts"),
    ({"w4a": "ct-w4a16-asym"}, "w4a", "", "asymmetric (zero-point) experts"),
])
def test_moe_export_refusals(moe, cli, tmp_path, sources, default, rules, match):
    fails(cli, tmp_path, write_recipe(tmp_path, moe, sources, default, rules), *CT, match=match)


def test_dense_export_refusals(llama, deepseek, cli, tmp_path):
    fails(cli, tmp_path, write_recipe(tmp_path, llama, {"gd": "gptq-desc"}, "gd"), *CT,
          match="desc_act permutation (g_idx), which compressed-tensors can no longer express")
    fails(cli, tmp_path, write_recipe(tmp_path, deepseek, {"gptq": "gptq"}, "gptq"), *CT,
          match="--to compressed-tensors is tested for")
    r = cli("build", write_recipe(tmp_path, llama, {"w4": "ct-w4a16"}, "w4"), "-o", tmp_path / "x", "--to", "gguf")
    assert r.exit_code == 2 and "--to 'gguf'" in r.output


def test_a_quantized_lm_head_is_refused_for_export():
    """No fixture producer quantizes lm_head (they all ignore it), so the rule is asked directly."""
    from mpconvert import ct_export
    from mpconvert.formats import Scheme
    from mpconvert.layout import ModelInfo, role_of
    from mpconvert.rules import Linear

    fp8 = Scheme.of("fp8", layout="ct", strategy="channel", block=None, activation="dynamic")
    head = Linear("lm_head", role_of("lm_head"), fp8, "fp8", "rules[0]", 1024, 256)
    [problem] = ct_export.problems([head], {"lm_head": {"format": "fp8", "params": fp8.params,
                                                       "members": ["lm_head"]}},
                                   ModelInfo("llama", 2, 4, 4, 0))
    assert "lm_head is quantized" in problem.message and "take lm_head from the base" in problem.message


def test_an_output_mixed_again(dense_ct, llama, cli, tmp_path):
    """A user mixing again from an earlier output: an export (--to compressed-tensors) reads as any compressed-tensors
    source, each module's bytes as the export holds them; an output in mpconvert's own layout is refused as a source
    and as the base, each with its fix."""
    export, m = dense_ct
    out = tmp_path / "again"
    again = build(cli, write_recipe(tmp_path, {**llama, "again": export}, {"again": "again"}, "again"), out)
    assert again["sources"]["again"]["kind"] == "compressed-tensors"
    digest = {t["name"]: t["sha256"] for mod in m["modules"].values() for t in mod["tensors"].values()}
    linears = [mod for name, mod in again["modules"].items() if mod["kind"] == "linear"]
    assert linears and all(t["sha256"] == digest[t.get("renamed_from", t["name"])] for mod in linears
                           for t in mod["tensors"].values())
    assert cli("verify", out).exit_code == 0
    own = tmp_path / "own"
    build(cli, write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq"), own)
    text = fails(cli, tmp_path, write_recipe(tmp_path, {**llama, "own": own}, {"own": "own"}, "own"),
                 match="is an mpconvert output in its own layout")
    assert "--to compressed-tensors" in text
    text = fails(cli, tmp_path, write_recipe(tmp_path, {**llama, "base": own}, {"gptq": "gptq"}, "gptq"),
                 match="is an mpconvert output in its own layout")
    assert "sources.base" in text
