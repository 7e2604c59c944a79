"""The runtime shim with real SGLang 0.5.17 classes on CPU: plugin discovery, per-layer native methods, loading."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch

from mpconvert.runtime_shim.engine_check import sha  # the hash engine_check reports for each parameter

from helpers import (DENSE_RULES, DENSE_SOURCES, THREE_SOURCES, build, edited_source, load, loaded, refusal, refused,
                     write_recipe)


def built_and_loaded(fixtures: dict, cli, tmp_path: Path, default: str, rules: str) -> dict:
    """Build a recipe over CT block FP8, CT Int8 and GPTQ; SGLang builds and loads it at TP=1 in fp16 (GPTQ MoE runs
    fp16 only). The rank's result."""
    build(cli, write_recipe(tmp_path, fixtures, THREE_SOURCES, default, rules), tmp_path / "out")
    [r] = loaded(tmp_path / "out", dtype="float16")
    return r


def test_dense_mixed_binds_native_methods_and_loads(llama, cli, tmp_path):
    recipe = write_recipe(tmp_path, llama, DENSE_SOURCES, "gptq", DENSE_RULES)
    build(cli, recipe, tmp_path / "out")
    [r] = loaded(tmp_path / "out")
    assert r["quant_config"] == "MpconvertConfig"
    m = r["methods"]
    assert m["model.layers.0.self_attn.qkv_proj"] == ["CompressedTensorsLinearMethod", "CompressedTensorsW8A8Fp8"]
    assert m["model.layers.0.self_attn.o_proj"][0] == "CompressedTensorsLinearMethod"
    assert m["model.layers.0.mlp.gate_up_proj"][0] == "W8A8Int8LinearMethod"
    assert m["model.layers.1.self_attn.qkv_proj"] == ["AWQLinearMethod", "AWQMarlinLinearScheme"]
    assert m["model.layers.1.mlp.down_proj"][0] == "GPTQMarlinLinearMethod"
    assert m["lm_head"][0] == "UnquantizedEmbeddingMethod"  # ParallelLMHead: SGLang's unquantized head
    p = r["params"]
    assert p["model.layers.1.mlp.down_proj.qweight"][:2] == ["torch.int32", [64, 256]]
    assert p["model.layers.0.mlp.gate_up_proj.weight"][:2] == ["torch.int8", [1024, 256]]
    # the bytes SGLang holds after load_weights are the converted checkpoint's, fused as SGLang fuses them
    out = load(tmp_path / "out")
    L0 = "model.layers.0"
    assert p[f"{L0}.self_attn.qkv_proj.weight"][2] == sha(torch.cat([out[f"{L0}.self_attn.{x}_proj.weight"]
                                                                     for x in "qkv"]))
    assert p[f"{L0}.mlp.gate_up_proj.weight"][2] == sha(torch.cat([out[f"{L0}.mlp.{x}_proj.weight"]
                                                                   for x in ("gate", "up")]))
    assert p["model.layers.1.mlp.down_proj.qweight"][2] == sha(out["model.layers.1.mlp.down_proj.qweight"])


def test_moe_mixed_binds_fused_moe_per_layer_and_loads(moe, cli, tmp_path):
    rules = """
    - {match: "mlp.experts.*", layers: 0, source: fp8}
    - {match: "self_attn.*", layers: 0, source: int8}
    """
    build(cli, write_recipe(tmp_path, moe, THREE_SOURCES, "gptq", rules), tmp_path / "out")
    # GPTQ-Marlin MoE runs fp16 activations only: in the model's own bf16 the shim refuses at load, naming the layer
    err = refusal(tmp_path / "out")
    assert "model.layers.1.mlp.experts is GPTQ MoE" in err and "--dtype float16" in err
    [r] = loaded(tmp_path / "out", dtype="float16")
    m, p = r["methods"], r["params"]
    assert m["model.layers.0.mlp.experts"] == ["CompressedTensorsFusedMoEMethod", "CompressedTensorsW8A8Fp8MoE"]
    assert m["model.layers.1.mlp.experts"] == ["GPTQMarlinMoEMethod", "GPTQMarlinMoEScheme"]
    assert m["model.layers.0.self_attn.qkv_proj"][0] == "W8A8Int8LinearMethod"
    assert m["model.layers.1.self_attn.qkv_proj"][0] == "GPTQMarlinLinearMethod"
    assert m["model.layers.0.mlp.gate"][0] == "UnquantizedLinearMethod"  # the router stays bf16
    out = load(tmp_path / "out")
    E = "model.layers.0.mlp.experts"
    w13 = torch.stack([torch.cat([out[f"{E}.{e}.gate_proj.weight"], out[f"{E}.{e}.up_proj.weight"]])
                       for e in range(8)])
    assert p[f"{E}.w13_weight"][:2] == ["torch.float8_e4m3fn", [8, 512, 256]]
    assert p[f"{E}.w13_weight"][2] == sha(w13)
    assert p["model.layers.1.mlp.experts.w2_qweight"][2] == sha(torch.stack(
        [out[f"model.layers.1.mlp.experts.{e}.down_proj.qweight"] for e in range(8)]))


def test_dense_native_block_fp8_is_served_in_ct_layout(llama, cli, tmp_path):
    """SGLang's Llama loader renames `weight_scale_inv` and skips it (garbage on GPU): build writes those modules in
    the compressed-tensors layout, same bytes, and SGLang's compressed-tensors block-FP8 method loads every scale."""
    rules = """
    - {match: "mlp.*", layers: 0, source: gptq}
    """
    recipe = write_recipe(tmp_path, llama, {"nfp8": "native-fp8-block", "gptq": "gptq"}, "nfp8", rules)
    manifest = build(cli, recipe, tmp_path / "out")
    q = manifest["modules"]["model.layers.1.self_attn.q_proj"]
    assert q["params"]["layout"] == "ct" and q["params"]["converted_from"] == "native"
    assert q["tensors"]["weight_scale"]["renamed_from"] == "weight_scale_inv"
    [r] = loaded(tmp_path / "out")
    assert r["methods"]["model.layers.1.self_attn.qkv_proj"] == ["CompressedTensorsLinearMethod",
                                                                  "CompressedTensorsW8A8Fp8"]
    assert r["methods"]["model.layers.0.mlp.down_proj"][0] == "GPTQMarlinLinearMethod"
    src = load(llama["native-fp8-block"])
    L1 = "model.layers.1.self_attn"
    assert r["params"][f"{L1}.qkv_proj.weight_scale"][2] == sha(torch.cat(
        [src[f"{L1}.{x}_proj.weight_scale_inv"] for x in "qkv"]))


def test_dense_mixed_tp2_each_rank_holds_its_shard(llama, cli, tmp_path):
    """TP=2 as two gloo ranks: each rank's parameters are exactly its slice of the converted tensors."""
    recipe = write_recipe(tmp_path, llama, DENSE_SOURCES, "gptq", DENSE_RULES)
    build(cli, recipe, tmp_path / "out", "--tp", "2")
    results = loaded(tmp_path / "out", 2)
    out = load(tmp_path / "out")
    L0, L1 = "model.layers.0", "model.layers.1"
    for rank, r in enumerate(results):
        p, half = r["params"], slice(rank * 128, (rank + 1) * 128)
        assert r["methods"][f"{L1}.self_attn.qkv_proj"] == ["AWQLinearMethod", "AWQMarlinLinearScheme"]
        assert p[f"{L0}.self_attn.qkv_proj.weight"][:2] == ["torch.float8_e4m3fn", [384, 256]]
        assert p[f"{L0}.self_attn.qkv_proj.weight"][2] == sha(torch.cat(
            [out[f"{L0}.self_attn.{x}_proj.weight"][half] for x in "qkv"]))
        assert p[f"{L0}.self_attn.o_proj.weight"][2] == sha(out[f"{L0}.self_attn.o_proj.weight"][:, half])
        cols = slice(rank * 256, (rank + 1) * 256)
        assert p[f"{L0}.mlp.down_proj.weight"][2] == sha(out[f"{L0}.mlp.down_proj.weight"][:, cols])
        assert p[f"{L1}.mlp.gate_up_proj.qweight"][2] == sha(torch.cat(
            [out[f"{L1}.mlp.{x}_proj.qweight"][:, cols] for x in ("gate", "up")], dim=1))


MOE_TP_RULES = """
- {match: "mlp.experts.*", layers: 0, source: awq}
- {match: "mlp.experts.*", layers: 1, source: int8}
- {match: "self_attn.*", layers: 0, source: awq}
"""


def test_moe_awq_and_int8_experts_tp1_and_tp2(moe, cli, tmp_path):
    """AWQ-Marlin and W8A8-Int8 FusedMoE, in the model's bf16, at TP=1 and per TP=2 rank: native methods, every
    parameter written, each rank holding exactly its slice of the experts. (Block-FP8 k_proj cannot split at TP=2
    here: 64 output rows per rank, block 128.)"""
    recipe = write_recipe(tmp_path, moe, {"int8": "ct-w8a8", "awq": "awq"}, "int8",
                          MOE_TP_RULES)
    build(cli, recipe, tmp_path / "out", "--tp", "2")
    [tp1], ranks = loaded(tmp_path / "out"), loaded(tmp_path / "out", 2)
    out = load(tmp_path / "out")
    E0, E1 = "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"
    for r in [tp1, *ranks]:
        assert r["methods"][E0] == ["AWQMoEMethod", "AWQMoEScheme"]  # AWQ-Marlin MoE (fallback: MoeWNA16Method)
        assert r["methods"][E1][0] == "W8A8Int8MoEMethod"
        assert r["methods"]["model.layers.0.self_attn.qkv_proj"] == ["AWQLinearMethod", "AWQMarlinLinearScheme"]
        assert r["methods"]["model.layers.1.self_attn.qkv_proj"][0] == "W8A8Int8LinearMethod"
    assert tp1["params"][f"{E1}.w13_weight"][2] == sha(torch.stack(
        [torch.cat([out[f"{E1}.{e}.gate_proj.weight"], out[f"{E1}.{e}.up_proj.weight"]]) for e in range(8)]))
    for k, r in enumerate(ranks):
        rows = slice(k * 128, (k + 1) * 128)  # moe_intermediate_size 256 split over 2 ranks
        p = r["params"]
        assert p[f"{E1}.w13_weight"][:2] == ["torch.int8", [8, 256, 256]]
        assert p[f"{E1}.w13_weight"][2] == sha(torch.stack(
            [torch.cat([out[f"{E1}.{e}.gate_proj.weight"][rows], out[f"{E1}.{e}.up_proj.weight"][rows]])
             for e in range(8)]))
        assert p[f"{E1}.w2_weight"][2] == sha(torch.stack([out[f"{E1}.{e}.down_proj.weight"][:, rows]
                                                           for e in range(8)]))
        # AWQ qweight is [in, out/8]: down_proj's input (the intermediate) is split by rows
        assert p[f"{E0}.w2_qweight"][2] == sha(torch.stack([out[f"{E0}.{e}.down_proj.qweight"][rows]
                                                            for e in range(8)]))


def test_serve_command(moe, cli, tmp_path, monkeypatch):
    """`mpconvert serve` launches SGLang's own server on the directory; GPTQ MoE gets --dtype float16 unless given."""
    recipe = write_recipe(tmp_path, moe, {"gptq": "gptq"}, "gptq")
    build(cli, recipe, tmp_path / "out")
    r = cli("serve", tmp_path / "out", "--print-command", "--", "--tp", "2")
    assert r.exit_code == 0
    assert r.stdout.split()[1:] == ["-m", "sglang.launch_server", "--model-path", str(tmp_path / "out"), "--tp", "2",
                                    "--dtype", "float16"]
    r = cli("serve", tmp_path / "out", "--print-command", "--", "--dtype=bfloat16")
    assert r.stdout.split()[-1] == "--dtype=bfloat16"
    # a value the weights leave open goes to SGLang as given (a longer context: rope scaling, max positions)
    longer = '{"max_position_embeddings": 65536, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}'
    r = cli("serve", tmp_path / "out", "--print-command", "--", "--json-model-override-args", longer)
    assert r.exit_code == 0, r.output
    assert shlex.split(r.stdout)[-4:] == ["--json-model-override-args", longer, "--dtype", "float16"]
    # the directory's own path, spelled another way, is no other model
    r = cli("serve", tmp_path / "out", "--print-command", "--", "--model-path", f"{tmp_path}/./out/")
    assert r.exit_code == 0 and r.stdout.split()[-4:] == ["--model-path", f"{tmp_path}/./out/", "--dtype", "float16"]
    # a draft model of another directory takes the quantization it names (serve checks only this directory's)
    draft = ["--speculative-draft-model-path", str(tmp_path), "--speculative-draft-model-quantization", "fp8"]
    r = cli("serve", tmp_path / "out", "--print-command", "--", *draft)
    assert r.exit_code == 0 and shlex.split(r.stdout)[-6:-2] == draft, r.output
    monkeypatch.setenv("SGLANG_PLUGINS", "other")
    r = cli("serve", tmp_path / "out", "--print-command")
    assert r.exit_code == 2 and "leaves out the mpconvert plugin" in r.output


@pytest.mark.parametrize("args,message", [
    (["--tp", "3"], "out cannot be served with --tp 3: num_attention_heads=4 is not divisible by 3 (and "),
    (["--tensor-parallel-size=3", "--port", "30000"], "cannot be served with --tp 3:"),
    (["--tp", "4", "--enable-dp-attention", "--dp", "3"], "cannot be served with --tp 4 --dp 3: DP attention splits "
                                                          "attention over tp / dp ranks; --tp must"),
    (["--model-path", "/elsewhere"], "the arguments after -- name another model (/elsewhere); serve passes"),
    (["--model=/elsewhere"], "name another model (/elsewhere)"),
    (["--tp", "two"], "SGLang's launch_server refuses the arguments after --: argument "
                      "--tp-size/--tensor-parallel-size: invalid int value: 'two'"),
    (["--config", "{tmp}/sglang.yaml"], "cannot be served with --tp 3:"),
    (["--config", "{tmp}/broken.yaml"], "SGLang's launch_server cannot read its --config: while parsing a flow "
                                        "sequence"),
    # config values set at launch: what the build decided (the layers' formats, every size the weights have) is not
    # the launch's to change — verify's config rule, as it refuses an edited config.json
    (["--json-model-override-args", '{"quantization_config": {}}'], "sets quantization_config, which build wrote to "
                                                                     "say how each layer"),
    (["--json-model-override-args", '{"num_hidden_layers": 1}'], "config.json num_hidden_layers=1, but the weights "
                                                                 "hold layers 0-1"),
    (["--json-model-override-args={\"num_experts\": 4}"], "has shape [8, 256], but config.json implies [4, 256]"),
    (["--json-model-override-args", '{"moe_intermediate_size": 64}'], "down_proj.weight has shape [256, 256], but "
                                                                      "config.json implies [256, 64]"),
    (["--json-model-override-args", "[1]"], "--json-model-override-args: [1] is not a JSON object"),
    (["--json-model-override-args", "{'a': 1}"], "--json-model-override-args: not JSON"),
    (["--decrypted-config-file", "{tmp}/other.json"], "makes SGLang read {tmp}/other.json instead of"),
    # a quantization method named at launch: SGLang ignores it for an mpconvert directory, but `humming` takes over
    # every layer (and w8a8_* a compressed-tensors export's: test_export)
    (["--quantization", "w8a8_int8"], "--quantization w8a8_int8: {tmp}/out/config.json says how each layer is stored "
                                      "(quant_method 'mpconvert'); SGLang would ignore w8a8_int8 or read every layer"),
    (["--quantization=humming"], "--quantization humming: {tmp}/out/config.json says"),
    (["--quantization", "unquant"], "leave --quantization out"),
    (["--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", "{tmp}/out/.",
      "--speculative-draft-model-quantization", "fp8"], "--speculative-draft-model-quantization fp8: {tmp}/out/"),
])
def test_serve_refuses_before_sglang_starts(moe, cli, tmp_path, args, message):
    """What launch_server would run with, read by SGLang's own parser (aliases, `--x=y`, a --config file): sizes at
    which a layer cannot be split are refused in a second with verify's own rule, not by SGLang after loading; a model
    path of its own among the arguments (argparse keeps the last: it would have served that one) is refused."""
    (tmp_path / "sglang.yaml").write_text("tp-size: 3\n")
    (tmp_path / "broken.yaml").write_text("tp-size: [3\n")
    recipe = write_recipe(tmp_path, moe, {"gptq": "gptq"}, "gptq")
    build(cli, recipe, tmp_path / "out")
    r = cli("serve", tmp_path / "out", "--print-command", "--", *(a.replace("{tmp}", str(tmp_path)) for a in args))
    refused(r, message.replace("{tmp}", str(tmp_path)))
    assert "sglang.launch_server" not in r.stdout


SGLANG_LOG = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s", stream=sys.stdout)
from sglang.srt.plugins import load_plugins
load_plugins()  # as every SGLang process does: the shim through its entry point
from sglang.srt.configs.model_config import ModelConfig
for path, quantization in zip(sys.argv[1::2], sys.argv[2::2]):
    print("MODEL", path)
    ModelConfig(path, quantization=quantization or None)
"""


def test_sglang_does_not_call_the_shim_unoptimized(llama, cli, tmp_path):
    """SGLang's ModelConfig warns that a quantization method outside its own list "is not fully optimized yet. The
    speed can be slower than non-quantized models" — false for mpconvert (every layer on its format's native kernel),
    so the shim drops that one record; SGLang still says it of a method it means (AWQ without Marlin)."""
    import subprocess
    import sys

    build(cli, write_recipe(tmp_path, llama, DENSE_SOURCES, "gptq", DENSE_RULES), tmp_path / "out")
    p = subprocess.run([sys.executable, "-c", SGLANG_LOG, str(tmp_path / "out"), "", str(llama["awq"]), "awq"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    ours, awq = p.stdout.split("MODEL ")[1:]
    assert "quantization is not fully optimized" not in ours
    assert "awq quantization is not fully optimized yet" in awq


def test_a_shim_that_cannot_load_is_named_before_sglang_starts(moe, cli, tmp_path):
    """The shim failing to import against the SGLang installed (an internal it uses renamed): SGLang logs the failed
    plugin, starts, and fails each worker with only "Unknown quantization method: mpconvert". serve refuses before
    starting SGLang and verify --engine reports it, each naming the import that failed. The broken shim is this
    checkout's package with one import of sglang_config.py pointed at a name SGLang does not have."""
    import subprocess
    import sys

    import mpconvert
    import mpconvert.cli
    import mpconvert.runtime_shim

    build(cli, write_recipe(tmp_path, moe, {"int8": "ct-w8a8"}, "int8"), tmp_path / "out")
    pkg = tmp_path / "broken" / "mpconvert"  # the package as pyproject maps it: converter/, cli/, runtime_shim/
    pkg.mkdir(parents=True)
    for p in Path(mpconvert.__file__).parent.glob("*.py"):
        (pkg / p.name).symlink_to(p)
    for sub in ("formats",):
        (pkg / sub).symlink_to(Path(mpconvert.__file__).parent / sub)
    (pkg / "cli").symlink_to(Path(mpconvert.cli.__file__).parent)
    shim = pkg / "runtime_shim"
    shim.mkdir()
    for p in Path(mpconvert.runtime_shim.__file__).parent.glob("*.py"):
        text = p.read_text()
        if p.name == "sglang_config.py":
            text = text.replace("from __future__ import annotations\n", "from __future__ import annotations\n"
                                "from sglang.srt.layers.quantization import no_such_name  # noqa\n", 1)
            assert "no_such_name" in text
        (shim / p.name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(pkg.parent)}

    def run(*args):
        return subprocess.run([sys.executable, "-c", "from mpconvert.cli.main import main; main()", *map(str, args)],
                              env=env, capture_output=True, text=True)

    r = run("serve", tmp_path / "out", "--print-command")
    assert r.returncode == 2 and "sglang.launch_server" not in r.stdout, r.stdout + r.stderr
    assert "could not serve" in r.stderr and "the runtime shim cannot load in SGLang " in r.stderr
    assert "(ImportError: cannot import name 'no_such_name'" in r.stderr
    r = run("verify", tmp_path / "out", "--engine", "sglang", "--json")
    assert r.returncode == 1
    errors = [run["error"] for run in json.loads(r.stdout)["engine"]["runs"]]
    assert errors and all("the runtime shim cannot load in SGLang" in e and "no_such_name" in e for e in errors)


def test_shared_expert_and_routed_experts_in_different_formats(qwen2moe, cli, tmp_path):
    """Qwen2-MoE: the shared expert (a plain gate_up/down MLP beside FusedMoE) in W8A8-Int8, routed experts in
    CT block FP8 (layer 0) and GPTQ (layer 1, so fp16), attention with bias in Int8/GPTQ; routers stay bf16."""
    rules = """
    - {match: "mlp.experts.*", layers: 0, source: fp8}
    - {match: "mlp.shared_expert.*", source: int8}
    - {match: "self_attn.*", layers: 1, source: int8}
    """
    r = built_and_loaded(qwen2moe, cli, tmp_path, "gptq", rules)
    m = r["methods"]
    L0, L1 = "model.layers.0", "model.layers.1"
    assert m[f"{L0}.mlp.experts"] == ["CompressedTensorsFusedMoEMethod", "CompressedTensorsW8A8Fp8MoE"]
    assert m[f"{L1}.mlp.experts"] == ["GPTQMarlinMoEMethod", "GPTQMarlinMoEScheme"]
    for L in (L0, L1):
        assert m[f"{L}.mlp.shared_expert.gate_up_proj"][0] == "W8A8Int8LinearMethod"
        assert m[f"{L}.mlp.shared_expert.down_proj"][0] == "W8A8Int8LinearMethod"
        assert m.get(f"{L}.mlp.shared_expert_gate", ["UnquantizedLinearMethod"])[0] == "UnquantizedLinearMethod"
    assert m[f"{L0}.self_attn.qkv_proj"][0] == "GPTQMarlinLinearMethod"
    assert m[f"{L1}.self_attn.qkv_proj"][0] == "W8A8Int8LinearMethod"
    out = load(tmp_path / "out")
    S = f"{L0}.mlp.shared_expert"
    assert r["params"][f"{S}.gate_up_proj.weight"][2] == sha(torch.cat([out[f"{S}.gate_proj.weight"],
                                                                        out[f"{S}.up_proj.weight"]]))
    # the bf16 bias becomes the model dtype (fp16 here, for GPTQ MoE), as SGLang casts every float parameter
    assert r["params"][f"{L1}.self_attn.qkv_proj.bias"][:2] == ["torch.float16", [512]]
    assert r["params"][f"{L1}.self_attn.qkv_proj.bias"][2] == sha(torch.cat(
        [out[f"{L1}.self_attn.{x}_proj.bias"] for x in "qkv"]).to(torch.float16))
    # Qwen-MoE's one shared_expert is fused like DeepSeek's shared_experts where SGLang fuses it (Qwen3-Next, AMD):
    # the shim keeps it apart from routed experts of another format
    from mpconvert.manifest import load_manifest
    from mpconvert.runtime_shim.sglang_config import shared_experts_apart

    assert shared_experts_apart(load_manifest(tmp_path / "out")[0]) == (
        f"{L0}.mlp.shared_expert.down_proj is int8 where the routed experts are fp8")


DEEPSEEK_RULES = """
- {match: "self_attn.kv_b_proj", source: base}
- {match: "self_attn.*", layers: 1, source: fp8}
- {match: "mlp.shared_experts.*", layers: 1, source: fp8}
- {match: "mlp.experts.*", layers: 1, source: gptq}
"""  # the routed experts GPTQ (so fp16): kv_b_proj stays bf16 — SGLang absorbs an FP8 or Int8 one in bfloat16


def test_deepseek_mla_and_moe_in_three_formats(deepseek, cli, tmp_path):
    """DeepSeek-V2: fused q_a/kv_a (MLA) in block FP8 and Int8, shared experts in FP8, routed experts in GPTQ (so
    fp16, and kv_b_proj bf16), the dense layer 0 in Int8; then, in a bf16 model (Int8 experts), kv_b_proj in block FP8
    and Int8 too (absorbed into w_kc/w_vc by SGLang's loader after loading)."""
    m = built_and_loaded(deepseek, cli, tmp_path, "int8", DEEPSEEK_RULES)["methods"]
    L0, L1 = "model.layers.0", "model.layers.1"
    fp8 = ["CompressedTensorsLinearMethod", "CompressedTensorsW8A8Fp8"]
    assert m[f"{L1}.self_attn.fused_qkv_a_proj_with_mqa"] == fp8
    assert m[f"{L0}.self_attn.fused_qkv_a_proj_with_mqa"][0] == "W8A8Int8LinearMethod"
    assert {m[f"{L}.self_attn.kv_b_proj"][0] for L in (L0, L1)} == {"UnquantizedLinearMethod"}
    assert m[f"{L0}.mlp.gate_up_proj"][0] == "W8A8Int8LinearMethod"
    assert m[f"{L1}.mlp.shared_experts.gate_up_proj"] == fp8
    assert m[f"{L1}.mlp.experts"] == ["GPTQMarlinMoEMethod", "GPTQMarlinMoEScheme"]
    build(cli, write_recipe(tmp_path, deepseek, THREE_SOURCES, "int8", '- {match: "self_attn.*", layers: 1, '
                                                                        'source: fp8}'), tmp_path / "bf16")
    [r] = loaded(tmp_path / "bf16")
    assert r["methods"][f"{L1}.self_attn.kv_b_proj"] == fp8
    assert r["methods"][f"{L0}.self_attn.kv_b_proj"][0] == "W8A8Int8LinearMethod"


def test_deepseek_mix_that_no_dtype_serves(deepseek, cli, tmp_path):
    """SGLang's DeepSeek loader absorbs an FP8 or Int8 kv_b_proj into w_kc/w_vc in bfloat16, and GPTQ-Marlin MoE runs
    float16 only: on an H100 such a mix loaded, then failed at the first forward ("expected scalar type Half but
    found BFloat16", docs/gpu-results.md). Build refuses the mix naming both units; a bf16 kv_b_proj builds; and the
    shim refuses an FP8 kv_b_proj in a float16 model at load (verify --engine), as it does GPTQ experts in bf16."""
    rules = '- {match: "self_attn.*", layers: 1, source: fp8}\n- {match: "mlp.experts.*", source: gptq}'
    r = cli("build", write_recipe(tmp_path, deepseek, THREE_SOURCES, "int8", rules), "-o", tmp_path / "mix")
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and not (tmp_path / "mix").exists(), text
    assert "no model dtype serves this mix in SGLang 0.5.17: model.layers.0.self_attn.kv_b_proj (int8 from 'int8' " \
           "via default (int8)) runs in bfloat16 only, model.layers.1.mlp.experts (gptq from 'gptq' via rules[1]" \
           in text
    assert "→ gptq)) in float16 only — take one of them from another source" in text
    build(cli, write_recipe(tmp_path, deepseek, THREE_SOURCES, "int8", '- {match: "self_attn.kv_b_proj", source: '
                                                                        'base}\n' + rules), tmp_path / "ok")
    assert loaded(tmp_path / "ok", dtype="float16")
    build(cli, write_recipe(tmp_path, deepseek, THREE_SOURCES, "fp8"), tmp_path / "fp8")
    rep = json.loads(cli("verify", tmp_path / "fp8", "--fast", "--engine", "sglang", "--dtype", "float16",
                         "--json").stdout)
    assert not rep["ok"] and [f["check"] for f in rep["findings"]] == ["engine"]
    assert "model.layers.0.self_attn.kv_b_proj is fp8, which SGLang's DeepSeek loader absorbs in bfloat16, and " \
           "this model runs in torch.float16; serve it with --dtype bfloat16" in rep["findings"][0]["message"]


@pytest.mark.parametrize("case", ["one format", "shared apart", "mixed experts"])
def test_shared_experts_fused_only_into_experts_of_their_format(case, deepseek, cli, tmp_path, monkeypatch):
    """On a GPU SGLang fuses a layer's shared experts into its FusedMoE as extra experts (DeepSeek-V3 at 256 experts,
    GLM-4.5 always) and loads them through the routed experts' quant method. Shared experts in another format than
    the routed ones crashed that load (an FP8 block scale copied into an Int8 per-channel slot), and mixed routed
    experts were refused asking for --disable-shared-experts-fusion: `launch_server` did not just work (the GLM-4.5
    GPU part). The shim now turns fusion off for such a model; one format throughout still fuses. SGLang's fused
    path, which it takes on a GPU only, runs here through its own --enforce-shared-experts-fusion."""
    monkeypatch.setenv("MPCONVERT_SERVER_ARGS", json.dumps({"enforce_shared_experts_fusion": True}))
    rules = {"one format": "", "shared apart": '- {match: "mlp.shared_experts.*", source: fp8}',
             "mixed experts": '- {match: "mlp.experts.*", experts: "0-3", source: fp8}'}[case]
    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, deepseek, {"fp8": "ct-fp8-block", "int8": "ct-w8a8"}, "int8", rules), out)
    [rank] = loaded(out)
    fused = case == "one format"
    assert rank["moe"]["model.layers.1.mlp.experts"] == ([9, 9] if fused else [8, 8])  # 8 routed + 1 shared
    assert ("model.layers.1.mlp.shared_experts.gate_up_proj" in rank["methods"]) is not fused
    assert rank["fused_shared"] == ({"model.layers.1.mlp.experts": 1} if fused else {})
    # verify --engine's comparison knows fused shared experts have no layers of their own (it reported them missing)
    # and says where fused ones differ from the experts they load through (as if the shim had not stopped fusion)
    from mpconvert.engine import compare
    from mpconvert.manifest import load_manifest
    from mpconvert.verify import Report

    manifest, rep = load_manifest(out)[0], Report(str(out))
    compare(manifest, rank, "tp=1 rank 0", rep)
    assert rep.findings == []
    rank["fused_shared"] = {"model.layers.1.mlp.experts": 1}
    compare(manifest, rank, "tp=1 rank 0", rep)
    assert [f.where.rpartition(" ")[2] for f in rep.findings if "SGLang fused the shared experts" in f.message] == \
        ([] if fused else ["model.layers.1.mlp.experts"])


@pytest.mark.parametrize("value", ["nope", "[1]", '{"no_such_arg": 1}'])
def test_server_arguments_for_the_engine_check_that_sglang_cannot_take(value, llama, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MPCONVERT_SERVER_ARGS", value)
    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, llama, {"fp8": "ct-fp8-dynamic"}, "fp8"), out)
    assert f"MPCONVERT_SERVER_ARGS={value!r} is not a JSON object of SGLang server arguments" in refusal(out)


def test_deepseek_packed_int4_in_mla_is_refused(deepseek, cli, tmp_path):
    """SGLang's MLA loader decodes a packed kv_b_proj as AWQ and fuses q_a/kv_a for AWQ only when the whole model is
    AWQ: GPTQ there would load wrong. One rule (rules.mla_problems) refuses it at build, and the shim with it."""
    from mpconvert.manifest import load_manifest, parse_manifest
    from mpconvert.runtime_shim.sglang_config import _check_mla

    recipe = write_recipe(tmp_path, deepseek, {"int8": "ct-w8a8", "gptq": "gptq"}, "int8",
                          '- {match: "self_attn.kv_b_proj", layers: 1, source: gptq}')
    r = cli("build", recipe, "-o", tmp_path / "out")
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "model.layers.1.self_attn.kv_b_proj is gptq (from 'gptq' via rules[0]" in text
    assert "in a deepseek_v2 model; SGLang's MLA loader decodes packed int4 there only" in text
    build(cli, write_recipe(tmp_path, deepseek, {"int8": "ct-w8a8"}, "int8"), tmp_path / "ok")
    m, _ = load_manifest(tmp_path / "ok")
    unit = "model.layers.1.self_attn.kv_b_proj"
    gptq = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    data = json.loads(m.dumps())  # the manifest edited as JSON and read back (a valid manifest; the MLA rule is not
    data["schemes"].append({"format": "gptq", "params": gptq})  # the schema's to check)
    data["modules"][unit]["scheme_id"] = len(data["schemes"]) - 1
    edited = parse_manifest(json.dumps(data).encode(), "edited")
    assert edited.modules[unit].format == "gptq"
    try:
        _check_mla(edited)
        raise AssertionError("the shim must refuse it")
    except ValueError as e:
        assert f"{unit} is gptq" in str(e)


def test_an_untested_sglang_is_warned_about_and_refuses_mixed_experts(monkeypatch):
    """register() checks SGLang's version against the tested ones: an untested one gets a loud warning naming them
    and the check to run, and mixed-format experts (SGLang's private fused-MoE internals) are refused there."""
    import warnings

    import pytest
    import sglang

    from mpconvert.runtime_shim import register
    from mpconvert.runtime_shim.mixed_experts import _refuse_untested_sglang
    from mpconvert.runtime_shim.sglang_versions import TESTED, version

    assert version() in TESTED  # what CI runs: both tested versions
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        register()  # a tested version: silent
    monkeypatch.setattr(sglang, "__version__", "0.9.99")
    with pytest.warns(RuntimeWarning, match="tested with SGLang 0.5.17 and 0.5.23, not 0.9.99.*--engine sglang"):
        register()
    with pytest.raises(ValueError, match="served only on the tested SGLang versions"):
        _refuse_untested_sglang("model.layers.0.mlp.experts")



def test_a_bias_the_model_class_has_no_parameter_for(mlp_bias, cli, tmp_path):
    """A Llama whose config says mlp_bias: SGLang's Llama builds its MLP without biases and its loader skips the
    checkpoint's `.bias` tensors it has no parameter for, silently: the FP8 build loaded and verify --engine said OK
    while every MLP ran without its bias. The shim now refuses it before loading, naming the unit and the tensor, and
    verify --engine reports it; q/k/v biases the class does build (Qwen2's, GLM-4.5's) still load (their tests)."""
    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, mlp_bias, {"fp8": "ct-fp8-dynamic"}, "fp8"), out)
    why = " ".join(refusal(out).split())
    assert ("SGLang's LlamaForCausalLM builds model.layers.0.mlp.down_proj without a bias, so its loader would skip "
            "model.layers.0.mlp.down_proj.bias without a word") in why, why
    r = cli("verify", out, "--engine", "sglang", "--json")
    assert r.exit_code == 1 and "without a bias" in r.output, r.output


def test_an_lm_head_bias_the_model_class_has_no_parameter_for(llama, cli, tmp_path):
    """The same outside the decoder layers: a Llama checkpoint with an `lm_head.bias` (SGLang's ParallelLMHead for
    Llama has none) loaded and verify --engine said OK while the logits came without it. Refused, naming it."""
    def add_bias(sd):
        sd["lm_head.bias"] = torch.randn(sd["lm_head.weight"].shape[0]).to(torch.bfloat16)

    base = edited_source(llama["base"], tmp_path / "base", add_bias)
    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, {**llama, "base": base}, {"fp8": "ct-fp8-dynamic"}, "fp8",
                            "- {match: lm_head, source: base}"), out)
    why = " ".join(refusal(out).split())
    assert "SGLang's LlamaForCausalLM builds lm_head without a bias, so its loader would skip lm_head.bias" in why, why


def test_a_model_class_that_leaves_a_part_unquantized(stablelm, cli, tmp_path):
    """SGLang's StableLM (0.5.17 and 0.5.23) builds its attention without the quantization config, so the shim is
    never asked for q/k/v or o_proj: they hold bf16 parameters, and an FP8 attention met them at load — a KeyError
    on the first weight_scale deep in SGLang's loader (with a loader that skips unknown names, the FP8 bytes would
    have been read in as values). The shim now checks the built model before loading and names the unit; an FP8 or
    GPTQ MLP beside the base's attention is bound and loads, and verify --engine reports the refusal."""
    fp8_attention = tmp_path / "attn"
    build(cli, write_recipe(tmp_path, stablelm, {"fp8": "ct-fp8-dynamic"}, "base",
                            '- {match: "self_attn.*", source: fp8}'), fp8_attention)
    why = " ".join(refusal(fp8_attention).split())
    assert ("SGLang's StableLmForCausalLM built model.layers.0.self_attn.qkv_proj without the quantization config"
            in why), why
    r = cli("verify", fp8_attention, "--engine", "sglang", "--json")
    assert r.exit_code == 1 and "without the quantization config" in r.output, r.output
    mlp = tmp_path / "mlp"
    build(cli, write_recipe(tmp_path, stablelm, {"fp8": "ct-fp8-dynamic", "gptq": "gptq"}, "base",
                            '- {match: "mlp.gate_proj", source: gptq}\n- {match: "mlp.up_proj", source: gptq}\n'
                            '- {match: "mlp.down_proj", source: fp8}'), mlp)
    [rank] = loaded(mlp)
    methods = rank["methods"]
    assert methods["model.layers.1.mlp.gate_up_proj"][0] == "GPTQMarlinLinearMethod"
    assert methods["model.layers.1.mlp.down_proj"][1] == "CompressedTensorsW8A8Fp8"
    assert methods["model.layers.1.self_attn.qkv_proj"][0] == "UnquantizedLinearMethod"
