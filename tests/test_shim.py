"""The runtime shim with real SGLang 0.5.17 classes on CPU: plugin discovery, per-layer native methods, loading."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from conftest import write_recipe
from test_build import DENSE_RULES
from test_verify import DENSE_SOURCES

HELPER = Path(__file__).parent / "sglang_cpu.py"


def sglang_model(path: Path) -> dict:
    p = subprocess.run([sys.executable, str(HELPER), str(path), str(random.randint(20000, 40000))],
                       capture_output=True, text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[-1][7:])


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
    manifest = json.loads((tmp_path / "out" / "mpconvert_manifest.json").read_text())
    all_tensors = {t["name"] for mod in manifest["modules"].values() for t in mod["tensors"].values()}
    assert set(r["loaded"]) == all_tensors  # SGLang's own load_weights consumed every tensor
    p = r["params"]
    assert p["model.layers.1.mlp.down_proj.qweight"] == ["torch.int32", [64, 256]]
    assert p["model.layers.0.self_attn.qkv_proj.weight"][0] == "torch.float8_e4m3fn"
    assert p["model.layers.0.mlp.gate_up_proj.weight"] == ["torch.int8", [1024, 256]]
