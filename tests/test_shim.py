"""The runtime shim with real SGLang 0.5.17 classes on CPU: plugin discovery, per-layer native methods, loading."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import write_recipe
from test_build import DENSE_RULES
from test_verify import DENSE_SOURCES

HELPER = Path(__file__).parent / "sglang_cpu.py"


def load(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def sha(t) -> str:
    t = t.contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def start(path: Path, port: str, *tp_rank: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPER), str(path), port, *tp_rank], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def result(p: subprocess.Popen) -> dict:
    stdout, stderr = p.communicate(timeout=600)
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, stderr[-3000:]
    return json.loads(line[-1][7:])


def sglang_model(path: Path) -> dict:
    return result(start(path, str(random.randint(20000, 40000))))


def not_loaded(r: dict) -> list[str]:
    """Parameters load_weights never wrote, less those SGLang derives later (GPTQ-Marlin MoE's sort order of g_idx,
    filled in process_weights_after_loading)."""
    return [n for n in r["untouched"] if not n.endswith("g_idx_sort_indices")]


def manifest_tensor_names(d: Path) -> set[str]:
    manifest = json.loads((d / "mpconvert_manifest.json").read_text())
    return {t["name"] for mod in manifest["modules"].values() for t in mod["tensors"].values()}


def test_dense_mixed_binds_native_methods_and_loads(llama, cli, tmp_path):
    recipe = write_recipe(tmp_path, llama, DENSE_SOURCES, "gptq", DENSE_RULES)
    assert cli("build", recipe, "-o", tmp_path / "out").exit_code == 0
    r = sglang_model(tmp_path / "out")
    assert r["quant_config"] == "MpconvertConfig"
    m = r["methods"]
    assert m["model.layers.0.self_attn.qkv_proj"] == ["CompressedTensorsLinearMethod", "CompressedTensorsW8A8Fp8"]
    assert m["model.layers.0.self_attn.o_proj"][0] == "CompressedTensorsLinearMethod"
    assert m["model.layers.0.mlp.gate_up_proj"][0] == "W8A8Int8LinearMethod"
    assert m["model.layers.1.self_attn.qkv_proj"] == ["AWQLinearMethod", "AWQMarlinLinearScheme"]
    assert m["model.layers.1.mlp.down_proj"][0] == "GPTQMarlinLinearMethod"
    assert m["lm_head"][0] == "UnquantizedEmbeddingMethod"  # ParallelLMHead: SGLang's unquantized head
    assert set(r["loaded"]) == manifest_tensor_names(tmp_path / "out")  # every tensor was offered to load_weights
    assert not_loaded(r) == []  # ... and it wrote every parameter (none silently skipped)
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
    recipe = write_recipe(tmp_path, moe, {"fp8": "ct-fp8-block", "int8": "ct-w8a8", "gptq": "gptq"}, "gptq", rules)
    assert cli("build", recipe, "-o", tmp_path / "out").exit_code == 0
    r = sglang_model(tmp_path / "out")
    m, p = r["methods"], r["params"]
    assert m["model.layers.0.mlp.experts"] == ["CompressedTensorsFusedMoEMethod", "CompressedTensorsW8A8Fp8MoE"]
    assert m["model.layers.1.mlp.experts"] == ["GPTQMarlinMoEMethod", "GPTQMarlinMoEScheme"]
    assert m["model.layers.0.self_attn.qkv_proj"][0] == "W8A8Int8LinearMethod"
    assert m["model.layers.1.self_attn.qkv_proj"][0] == "GPTQMarlinLinearMethod"
    assert m["model.layers.0.mlp.gate"][0] == "UnquantizedLinearMethod"  # the router stays bf16
    assert set(r["loaded"]) == manifest_tensor_names(tmp_path / "out")
    assert not_loaded(r) == []
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
    assert cli("build", recipe, "-o", tmp_path / "out").exit_code == 0
    manifest = json.loads((tmp_path / "out" / "mpconvert_manifest.json").read_text())
    q = manifest["modules"]["model.layers.1.self_attn.q_proj"]
    assert q["params"]["layout"] == "ct" and q["params"]["converted_from"] == "native"
    assert q["tensors"]["weight_scale"]["renamed_from"] == "weight_scale_inv"
    r = sglang_model(tmp_path / "out")
    assert r["methods"]["model.layers.1.self_attn.qkv_proj"] == ["CompressedTensorsLinearMethod",
                                                                  "CompressedTensorsW8A8Fp8"]
    assert r["methods"]["model.layers.0.mlp.down_proj"][0] == "GPTQMarlinLinearMethod"
    assert not_loaded(r) == []
    src = load(llama["native-fp8-block"])
    L1 = "model.layers.1.self_attn"
    assert r["params"][f"{L1}.qkv_proj.weight_scale"][2] == sha(torch.cat(
        [src[f"{L1}.{x}_proj.weight_scale_inv"] for x in "qkv"]))


def test_dense_mixed_tp2_each_rank_holds_its_shard(llama, cli, tmp_path):
    """TP=2 as two gloo ranks: each rank's parameters are exactly its slice of the converted tensors."""
    recipe = write_recipe(tmp_path, llama, DENSE_SOURCES, "gptq", DENSE_RULES)
    assert cli("build", recipe, "-o", tmp_path / "out", "--tp", "2").exit_code == 0
    port = str(random.randint(20000, 40000))
    procs = [start(tmp_path / "out", port, "2", str(rank)) for rank in (0, 1)]
    results = [result(p) for p in procs]
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
