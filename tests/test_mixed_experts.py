"""Expert-level mixed precision: experts of one MoE layer in different formats — recipe, build, verify, and the shim
with real SGLang classes (one native FusedMoE per format group, every expert's tensors loaded into its group)."""
from __future__ import annotations

import hashlib
import json

import torch

from mpconvert.engine import run_ranks
from mpconvert.runtime_shim.engine_check import sha

from helpers import MIXED_EXPERTS_RULES as RULES, THREE_SOURCES as SOURCES, build, check_faithful, fails, load, \
    loaded, manifest_tensor_names, write_recipe

# RULES — layer 0: experts 0-2 FP8, the rest GPTQ; layer 1: 0-2 FP8, 3/5/6 Int8, 4/7 GPTQ; attention Int8 (default)
E0, E1 = "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"
GROUPS_L1 = [("fp8", [0, 1, 2]), ("int8", [3, 5, 6]), ("gptq", [4, 7])]


def groups(manifest: dict, unit: str) -> list[tuple[str, list[int]]]:
    return [(g["format"], g["experts"]) for g in manifest["units"][unit]["groups"]]


def test_build_writes_expert_groups_byte_exact(moe, cli, tmp_path):
    recipe = write_recipe(tmp_path, moe, SOURCES, "int8", RULES)
    manifest = build(cli, recipe, tmp_path / "out", "--tp", "2")
    assert manifest["units"][E0]["format"] == "mixed_experts"
    assert groups(manifest, E0) == [("fp8", [0, 1, 2]), ("gptq", [3, 4, 5, 6, 7])]
    assert groups(manifest, E1) == GROUPS_L1
    assert manifest["modules"][f"{E1}.5.down_proj"]["format"] == "int8"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["formats"] == [
        "fp8", "gptq", "int8", "unquantized"]  # lm_head stays bf16
    worst = check_faithful(tmp_path / "out", manifest, moe, SOURCES, "qwen3_moe")
    assert set(worst) >= {"fp8", "gptq", "int8"}
    r = cli("inspect", tmp_path / "out", "--no-modules")
    assert f"{E1}: mixed_experts: fp8 [0-2], int8 [3,5-6], gptq [4,7]" in " ".join(r.output.split())
    r = cli("verify", tmp_path / "out", "--tp", "2", "--ep", "2", "--json")
    assert r.exit_code == 0, r.output


def test_shim_serves_each_format_group_natively_tp1_and_tp2(moe, cli, tmp_path):
    recipe = write_recipe(tmp_path, moe, SOURCES, "int8", RULES)
    build(cli, recipe, tmp_path / "out", "--tp", "2")
    out = load(tmp_path / "out")
    [tp1], ranks = loaded(tmp_path / "out", dtype="float16"), loaded(tmp_path / "out", 2, dtype="float16")
    native = {"fp8": ["CompressedTensorsFusedMoEMethod", "CompressedTensorsW8A8Fp8MoE"],
              "int8": ["W8A8Int8MoEMethod"], "gptq": ["GPTQMarlinMoEMethod", "GPTQMarlinMoEScheme"]}
    for k, r in enumerate([tp1, *ranks]):
        m, p = r["methods"], r["params"]
        assert m[E1][0] == "MixedExpertsMethod"
        # Triton-run groups route over all 8 experts (so their runner drops other groups' -1 slots); the Marlin
        # group gets other groups' slots as weight-0 slots of its own expert instead
        assert [r["moe"][f"{E1}.expert_groups.{g}"] for g in range(3)] == [[8, 3], [8, 3], [2, 2]]
        for g, (fmt, _) in enumerate(GROUPS_L1):
            assert m[f"{E1}.expert_groups.{g}"][:len(native[fmt])] == native[fmt]
        rows = slice(None) if k == 0 else slice((k - 1) * 128, k * 128)  # moe_intermediate_size 256 over TP ranks
        # each group holds exactly its experts, in manifest order, as its native method lays them out
        fp8, int8, gptq = (f"{E1}.expert_groups.{g}" for g in range(3))
        assert p[f"{fp8}.w13_weight"][:2] == ["torch.float8_e4m3fn", [3, 512 if k == 0 else 256, 256]]
        assert p[f"{fp8}.w13_weight"][2] == sha(torch.stack(
            [torch.cat([out[f"{E1}.{e}.gate_proj.weight"][rows], out[f"{E1}.{e}.up_proj.weight"][rows]])
             for e in (0, 1, 2)]))
        assert p[f"{int8}.w2_weight"][2] == sha(torch.stack([out[f"{E1}.{e}.down_proj.weight"][:, rows]
                                                             for e in (3, 5, 6)]))
        # (W8A8-Int8 MoE keeps its per-channel scales in float32: SGLang casts the checkpoint's on load)
        assert p[f"{int8}.w2_weight_scale"][:2] == ["torch.float32", [3, 256, 1]]
        assert p[f"{int8}.w2_weight_scale"][2] == sha(torch.stack([out[f"{E1}.{e}.down_proj.weight_scale"]
                                                                   for e in (3, 5, 6)]).float())
        # GPTQ qweight is [in/8, out]: down_proj's input (the intermediate) splits by rows
        qrows = slice(None) if k == 0 else slice((k - 1) * 16, k * 16)
        assert p[f"{gptq}.w2_qweight"][2] == sha(torch.stack([out[f"{E1}.{e}.down_proj.qweight"][qrows]
                                                              for e in (4, 7)]))
        # and its scales (one row per 128-group of the intermediate): this rank's groups only. SGLang 0.5.17 sizes
        # them for every rank's and leaves all but the first uninitialized (runtime_shim/sglang_fixes.py)
        groups_here = slice(None) if k == 0 else slice(k - 1, k)
        assert p[f"{gptq}.w2_scales"][:2] == ["torch.float16", [2, 2 if k == 0 else 1, 256]]
        assert p[f"{gptq}.w2_scales"][2] == sha(torch.stack([out[f"{E1}.{e}.down_proj.scales"][groups_here]
                                                             for e in (4, 7)]))
        # the layer's own routing parameters are empty: no second copy of any weight
        assert p[f"{E1}.w13_weight"][1] == [0] and p[f"{E1}.w13_qweight"][1] == [0]


def test_expert_parallel_ranks_hold_their_experts_of_each_group(moe, cli, tmp_path):
    """--tp 2 --ep 2: rank 0 holds experts 0-3, rank 1 experts 4-7 (SGLang's contiguous split); each rank builds the
    groups with experts in its range, each holding just those, at full intermediate size (moe_tp = tp / ep = 1)."""
    recipe = write_recipe(tmp_path, moe, SOURCES, "int8", RULES)
    build(cli, recipe, tmp_path / "out", "--tp", "2")
    out = load(tmp_path / "out")
    ranks = run_ranks(tmp_path / "out", 2, "float16", ep=2)
    names = manifest_tensor_names(tmp_path / "out")
    held = [{0: [0, 1, 2], 1: [3]}, {1: [5, 6], 2: [4, 7]}]  # layer 1: group → its experts on that rank
    for k, r in enumerate(ranks):
        assert "error" not in r, r["error"]
        assert (r["ep"], r["ep_rank"]) == (2, k) and set(r["loaded"]) == names and r["untouched"] == []
        groups_here = sorted(int(n.rsplit(".", 1)[1]) for n in r["methods"] if n.startswith(f"{E1}.expert_groups."))
        assert groups_here == sorted(held[k])
        for g, experts in held[k].items():
            sub = f"{E1}.expert_groups.{g}"
            assert r["moe"][sub][1] == len(experts)
            w2 = "w2_qweight" if g == 2 else "w2_weight"
            src = "qweight" if g == 2 else "weight"
            assert r["params"][f"{sub}.{w2}"][2] == sha(torch.stack([out[f"{E1}.{e}.down_proj.{src}"]
                                                                     for e in experts]))
    r = cli("verify", tmp_path / "out", "--tp", "2", "--ep", "2", "--engine", "sglang", "--dtype", "float16",
            "--json")
    assert r.exit_code == 0, r.output
    assert [(x["tp"], x["ep"], x["rank"]) for x in json.loads(r.stdout)["engine"]["runs"]] == [
        (1, 1, 0), (2, 2, 0), (2, 2, 1)]


def test_triton_groups_run_the_kernel_config_tuned_for_the_whole_layer(monkeypatch):
    """The Triton groups share one chain whose alignment and config lookups use the whole layer's expert count on
    this rank: a group of 16 of a layer's 128 FP8 experts runs the config SGLang tuned for the 128-expert layer (the
    same tokens per expert), on the lead group's BLOCK_SIZE_M, not the untuned default its own count would find.
    SGLang's real lookup and shipped tuning files; the GPU's name (none on a CPU) and exec settings given here."""
    from types import SimpleNamespace

    from sglang.srt.layers.moe.moe_runner.triton import TritonMoeQuantInfo
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe_triton_config as tuning

    from mpconvert.runtime_shim.mixed_experts import group_configs, layer_shapes

    monkeypatch.setattr(tuning, "get_device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(tuning, "get_exec", lambda: SimpleNamespace(
        deterministic=SimpleNamespace(enable_deterministic_inference=False)))
    tuning.get_moe_configs.cache_clear()
    # a group of 16 Qwen3-30B-A3B experts (hidden 2048, moe_intermediate 768), block FP8: its real weight shapes
    group = TritonMoeQuantInfo(w13_weight=torch.empty(16, 1536, 2048, dtype=torch.float8_e4m3fn, device="meta"),
                               w2_weight=torch.empty(16, 2048, 768, dtype=torch.float8_e4m3fn, device="meta"),
                               use_fp8_w8a8=True, block_shape=[128, 128])
    assert [w.shape for w in layer_shapes(group, 128)] == [(128, 1536, 2048), (128, 2048, 768)]
    for m in (1, 8, 32):
        x = torch.empty(m, 2048, dtype=torch.bfloat16, device="meta")
        gate_up, down = group_configs(group, 128, x, 8, block_m=32)
        args, kw = (8, "fp8_w8a8", m), dict(block_shape=[128, 128], return_down_config=True)
        layer, (layer_down, _) = tuning.try_get_optimal_moe_config((128, 1536, 2048), (128, 2048, 768), *args, **kw)
        alone, _ = tuning.try_get_optimal_moe_config((16, 1536, 2048), (16, 2048, 768), *args, **kw)
        assert gate_up == {**layer, "BLOCK_SIZE_M": 32}
        assert down == {**{k: v for k, v in (layer_down or layer).items() if k != "USE_TMA"}, "BLOCK_SIZE_M": 32}
        # the tuned file (bs 1: BLOCK_SIZE_N 64; bs 8: 5 stages; bs 32: GROUP_SIZE_M 1) is not the 16-expert default
        assert {**alone, "BLOCK_SIZE_M": 32} != gate_up
    tuning.get_moe_configs.cache_clear()


def test_triton_groups_in_one_sequence_compute_the_plain_layer():
    """SGLang's real fused-MoE sequence and Triton kernels under Triton's CPU interpreter (tests/interpreted_moe.py):
    a layer's experts split into two or three groups, in the shim's shared sequence, give exactly the output of the
    plain layer that SGLang runs itself — also with expert parallelism's -1 slots — and the plain layer matches a
    float32 reference. And the block tables that restrict each group to its experts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("interpreted_moe.py")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["plain_vs_reference"] < 0.01, got  # float16 kernels against float32; outputs are about 0.3
    assert got["two_groups_equal_plain"] and got["three_groups_equal_plain"], got
    assert got["ep_equal_plain"] and got["ep_differs_from_all_slots"], got
    # each group sees only its experts' blocks: its own id there, -1 elsewhere (another group's expert, another
    # rank's, and entries past the padded count, which the kernels never read: never outside the table)
    assert got["block_tables"] == [[-1, 0, 0, -1, -1, 1, -1, -1, -1, -1], [0, -1, -1, 1, 2, -1, 3, -1, -1, -1]]
    assert got["block_tables_contiguous"] and got["every_token"] == [True, True, True]


MOVED = """
import json, sys
import mpconvert.runtime_shim.engine_check as ec
import dataclasses
import mpconvert.runtime_shim.sglang_versions as versions
init_rank = versions.init_rank


def launched(server_args, *a):  # the server args engine_check made, with the launch flag set
    try:
        server_args.ep_num_redundant_experts = 2  # 0.5.23: a struct, settable until published
    except AttributeError:  # 0.5.17: read-only once resolved; a copy made with it
        server_args = dataclasses.replace(server_args, ep_num_redundant_experts=2)
    return init_rank(server_args, *a)


versions.init_rank = launched
ec.scaffold()
try:
    ec.build_and_load(sys.argv[1], sys.argv[2], 1, 0)
    print("RESULT loaded")
except ValueError as e:
    print("RESULT " + str(e))
"""


def test_experts_that_sglang_would_move_are_refused(moe, cli, tmp_path):
    """A mixed-experts layer's groups hold experts where SGLang places them by default; EPLB, redundant experts and
    --init-expert-location move them. Refused by serve before SGLang starts, and by the shim as SGLang's own loader
    builds the layer (launch_server run by hand); a MoE model without mixed layers is SGLang's to place."""
    import os
    import subprocess
    import sys

    from mpconvert.engine import rendezvous

    from helpers import refused

    build(cli, write_recipe(tmp_path, moe, SOURCES, "int8", RULES), tmp_path / "out")
    for args in (["--enable-eplb"], ["--ep-num-redundant-experts", "2"], ["--init-expert-location", "/x.json"]):
        refused(cli("serve", tmp_path / "out", "--print-command", "--", *args),
                f"{E0} mixes formats across its experts, in groups that keep SGLang's default expert placement; "
                f"{args[0]} moves experts — leave it out, or take this layer's experts from one source (and 1 more)")
    p = subprocess.run([sys.executable, "-c", MOVED, str(tmp_path / "out"), rendezvous(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "SGLANG_DTYPE": "float16"})
    said = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert said == [f"RESULT mpconvert: {E0} mixes formats across its experts, in groups that keep SGLang's default "
                    f"expert placement; --ep-num-redundant-experts moves experts — leave it out, or take this "
                    f"layer's experts from one source"], p.stdout[-2000:] + p.stderr[-2000:]
    (tmp_path / "one").mkdir()
    build(cli, write_recipe(tmp_path / "one", moe, SOURCES, "int8"), tmp_path / "one" / "out")
    assert cli("serve", tmp_path / "one" / "out", "--print-command", "--", "--enable-eplb").exit_code == 0


def test_gptq_group_needs_fp16_and_unquantized_group(moe, cli, tmp_path):
    """A GPTQ expert group runs on GPTQ-Marlin MoE (fp16 only): refused at load in bf16, naming the layer and its
    experts. bf16 experts (from the base) form a group on SGLang's unquantized fused MoE."""
    rules = """
    - {match: "mlp.experts.*", experts: "0-3", source: base}
    - {match: "mlp.experts.*", layers: 0, source: gptq}
    - {match: "mlp.experts.*", source: fp8}
    """
    recipe = write_recipe(tmp_path, moe, SOURCES, "int8", rules)
    manifest = build(cli, recipe, tmp_path / "out")
    assert groups(manifest, E0) == [("unquantized", [0, 1, 2, 3]), ("gptq", [4, 5, 6, 7])]
    [r] = run_ranks(tmp_path / "out", 1, "auto")
    assert "model.layers.0.mlp.experts experts 4-7 is GPTQ MoE" in r["error"] and "--dtype float16" in \
        r["error"]
    [r] = loaded(tmp_path / "out", dtype="float16")
    assert r["methods"][f"{E0}.expert_groups.0"][0] == "UnquantizedFusedMoEMethod"
    assert r["methods"][f"{E1}.expert_groups.1"][0] == "CompressedTensorsFusedMoEMethod"


def test_routing_file_picks_the_most_routed_experts(moe, cli, tmp_path):
    """experts: {file, top} / {file, coverage}: JSON counts per layer, or SGLang's expert-distribution dump."""
    counts = {"0": [5, 90, 1, 40, 0, 3, 7, 2], "1": [10, 10, 300, 0, 0, 0, 0, 80]}
    (tmp_path / "routing.json").write_text(json.dumps(counts))
    rules = """
    - {match: "mlp.experts.*", experts: {file: routing.json, top: 2}, source: fp8}
    - {match: "mlp.experts.*", source: gptq}
    """
    manifest = build(cli, write_recipe(tmp_path, moe, SOURCES, "int8", rules), tmp_path / "top")
    assert groups(manifest, E0) == [("gptq", [0, 2, 4, 5, 6, 7]), ("fp8", [1, 3])]
    assert groups(manifest, E1) == [("gptq", [0, 1, 3, 4, 5, 6]), ("fp8", [2, 7])]
    # the file decides formats, so the manifest records which file it was
    assert manifest["routing_files"] == {"routing.json": hashlib.sha256((tmp_path / "routing.json").read_bytes())
                                         .hexdigest()}
    # SGLang's dump: logical_count [steps, layers, experts], summed over steps; ties go to the lower id
    dump = torch.tensor([[[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 5, 0, 0, 0, 0]],
                         [[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 1, 0]]], dtype=torch.int64)
    torch.save({"logical_count": dump}, tmp_path / "dist.pt")
    rules = """
    - {match: "mlp.experts.*", experts: {file: dist.pt, coverage: 0.8}, source: fp8}
    - {match: "mlp.experts.*", source: gptq}
    """
    manifest = build(cli, write_recipe(tmp_path, moe, SOURCES, "int8", rules), tmp_path / "cov")
    assert groups(manifest, E0) == [("fp8", [0, 1]), ("gptq", [2, 3, 4, 5, 6, 7])]
    assert groups(manifest, E1) == [("gptq", [0, 1, 2, 4, 5, 6, 7]), ("fp8", [3])]  # 6 of 7 tokens ≥ 0.8


def test_bad_expert_recipes(moe, llama, cli, tmp_path):
    awq = write_recipe(tmp_path, moe, {"awq": "awq", "fp8": "ct-fp8-block"}, "awq",
                       '- {match: "mlp.experts.*", experts: "0-3", source: fp8}')
    t = fails(cli, tmp_path, awq, match="mixes formats across its experts")
    assert "a folded-scale source" in t and "take all of this layer's experts from 'awq'" in t
    split = write_recipe(tmp_path, moe, SOURCES, "int8", '- {match: "mlp.experts.*.gate_proj", experts: 0, '
                                                         'source: fp8}')
    fails(cli, tmp_path, split, match="expert 0 of model.layers.0.mlp.experts mixes formats")
    far = write_recipe(tmp_path, moe, SOURCES, "int8", '- {match: "mlp.experts.*", experts: "6-9", source: fp8}')
    fails(cli, tmp_path, far, match="names expert 9, but the model has 8 routed experts per layer (ids 0-7)")
    dense = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq", '- {match: "mlp.*", experts: 0, source: base}')
    fails(cli, tmp_path, dense, match="selects experts, but llama has no routed experts")
    both = write_recipe(tmp_path, moe, SOURCES, "int8",
                        '- {match: "mlp.experts.*", experts: {file: r.json, top: 2, coverage: 0.5}, source: fp8}')
    fails(cli, tmp_path, both, match="give exactly one of top (experts per layer) or coverage")
    missing = write_recipe(tmp_path, moe, SOURCES, "int8",
                           '- {match: "mlp.experts.*", experts: {file: nothere.json, top: 2}, source: fp8}')
    fails(cli, tmp_path, missing, match="nothere.json not found")
    (tmp_path / "short.json").write_text(json.dumps({"0": [1] * 8}))
    short = write_recipe(tmp_path, moe, SOURCES, "int8",
                         '- {match: "mlp.experts.*", experts: {file: short.json, top: 2}, source: fp8}')
    fails(cli, tmp_path, short, match="short.json has no counts for layer 1")


def test_glm45_experts_mixed_inside_a_layer(glm4moe, cli, tmp_path):
    """GLM-4.5's MoE (Glm4MoeForCausalLM: a dense first layer, a shared expert, a router with a score-correction bias,
    a bias on q/k/v) from llm-compressor's block FP8 and W8A8: FP8 experts 0-3 and shared expert, the rest Int8
    (attention with its bias among them) — built, within every band of the base, and bound by SGLang's own Glm4Moe at
    TP=1 and TP=2 (each rank's every parameter written, the mixed layer's two groups on their native methods)."""
    rules = """
    - {match: "mlp.experts.*", experts: "0-3", source: fp8}
    - {match: "mlp.shared_experts.*", source: fp8}
    """
    out = tmp_path / "out"
    m = build(cli, write_recipe(tmp_path, glm4moe, {"fp8": "ct-fp8-block", "int8": "ct-w8a8"}, "int8", rules), out,
              "--tp", "2")
    assert groups(m, E1) == [("fp8", [0, 1, 2, 3]), ("int8", [4, 5, 6, 7])]
    assert set(m["modules"]["model.layers.1.self_attn.q_proj"]["tensors"]) >= {"bias", "weight", "weight_scale"}
    r = cli("verify", out, "--numeric", "--base", glm4moe["base"], "--json")
    assert r.exit_code == 0 and json.loads(r.output)["findings"] == [], r.output
    for rank in [*loaded(out), *loaded(out, 2)]:
        methods = rank["methods"]
        assert methods[E1][0] == "MixedExpertsMethod"
        assert methods[f"{E1}.expert_groups.0"][0] == "CompressedTensorsFusedMoEMethod"
        assert methods[f"{E1}.expert_groups.1"][0] == "W8A8Int8MoEMethod"
        assert methods["model.layers.0.mlp.gate_up_proj"][0] == "W8A8Int8LinearMethod"  # the dense first layer
        assert methods["model.layers.1.self_attn.qkv_proj"][0] == "W8A8Int8LinearMethod"
        assert methods["model.layers.1.mlp.shared_experts.gate_up_proj"][0] == "CompressedTensorsLinearMethod"
