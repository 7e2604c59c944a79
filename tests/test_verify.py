"""verify on real converted checkpoints: clean ones pass; every injected corruption is caught with a precise message."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mpconvert.manifest import MANIFEST

from helpers import DENSE_RULES, DENSE_SOURCES, build, build_once, messages, mutate, run_verify, write_recipe


@pytest.fixture(scope="module")
def dense_out(llama, module_dir):
    return build_once(module_dir, llama, DENSE_SOURCES, "gptq", DENSE_RULES, "dense")


def test_clean_dense_passes_everything(dense_out, llama, cli):
    rep = run_verify(cli, dense_out, "--tp", "2", "--numeric", "--base", llama["base"])
    assert rep["ok"], messages(rep)
    n = rep["numeric"]
    print("calibration dense:", n["module_error_max"], [b["rel_error"] for b in n["blocks"]], n["logits_cosine"])
    assert set(n["module_error_max"]) >= {"fp8", "int8", "gptq"}
    assert n["logits_cosine"] > 0.9 and rep["memory"]["vs_bf16"] < 0.7
    assert rep["memory"]["bytes_per_rank"] < rep["memory"]["bytes"]


def test_clean_moe_passes_everything(moe, cli, tmp_path):
    sources = {"fp8": "ct-fp8-block", "int8": "ct-w8a8", "gptq": "gptq", "awq": "awq"}
    rules = """
    - {match: "mlp.experts.*", layers: 0, source: fp8}
    - {match: "self_attn.*", layers: 0, source: int8}
    - {match: "*", layers: 1, source: awq}
    """
    recipe = write_recipe(tmp_path, moe, sources, "gptq", rules)
    build(cli, recipe, tmp_path / "out")
    rep = run_verify(cli, tmp_path / "out", "--tp", "2", "--ep", "2", "--numeric", "--base", moe["base"])
    assert rep["ok"], messages(rep)
    n = rep["numeric"]
    print("calibration moe:", n["module_error_max"], [b["rel_error"] for b in n["blocks"]], n["logits_cosine"])
    assert set(n["module_error_max"]) >= {"fp8", "int8", "awq"}


def test_fast_mode_says_it_skipped_hashes(dense_out, cli):
    rep = run_verify(cli, dense_out, "--fast")
    assert rep["ok"] and not rep["hashed"] and "sha256 and NaN scan skipped" in rep["checks"][0]


L0 = "model.layers.0"
L1 = "model.layers.1"


def flip_byte(sd):
    t = sd[f"{L1}.mlp.up_proj.qweight"]
    t.view(-1)[5] ^= 1


def swap_pair(sd):
    a, b = f"{L0}.self_attn.q_proj.weight", f"{L0}.self_attn.k_proj.weight"
    sd[a], sd[b] = sd[b].clone(), sd[a].clone()


def missing_tensor(sd):
    sd.pop(f"{L1}.mlp.down_proj.g_idx")


def test_corruptions_are_all_caught(dense_out, llama, cli, tmp_path):
    smooth_scale = load_file(next(llama["ct-w8a8-smooth"].glob("*.safetensors")))[f"{L0}.mlp.gate_proj.weight_scale"]
    v2_qzeros = load_file(next(llama["gptq-v2"].glob("*.safetensors")))[f"{L1}.mlp.up_proj.qzeros"]
    base_norm = load_file(next(llama["base"].glob("*.safetensors")))[f"{L1}.input_layernorm.weight"]

    def wrong_scale(sd):  # int8 gate_proj with the scale of another (smoothed) int8 source
        sd[f"{L0}.mlp.gate_proj.weight_scale"] = smooth_scale.clone()

    def v2_zeros(sd):  # gptq_v2 zero points in a v1 module
        sd[f"{L1}.mlp.up_proj.qzeros"] = v2_qzeros.clone()

    def awq_with_base_norm(sd):  # AWQ q/k/v with the base model's norm instead of the AWQ-folded one
        sd[f"{L1}.input_layernorm.weight"] = base_norm.clone()

    def edit_manifest(d):
        m = json.loads((d / MANIFEST).read_text())
        m["modules"][f"{L0}.mlp.down_proj"]["source"] = "gptq"
        (d / MANIFEST).write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
        return d

    def truncate(d):
        shard = next(d.glob("model-*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:-4096])
        return d

    cases = {
        "flipped byte": (lambda d: mutate(dense_out, d, flip_byte), [],
                         f"{L1}.mlp.up_proj.qweight: sha256 differs"),
        "swapped pair": (lambda d: mutate(dense_out, d, swap_pair), [], f"{L0}.self_attn.q_proj.weight: sha256"),
        "scale from wrong source": (lambda d: mutate(dense_out, d, wrong_scale, rehash=True), ["numeric"],
                                    f"{L0}.mlp.gate_proj: weight error"),
        "gptq_v2 zero convention": (lambda d: mutate(dense_out, d, v2_zeros, rehash=True), [],
                                    f"{L1}.mlp.up_proj: {L1}.mlp.up_proj.qzeros: a symmetric gptq checkpoint"),
        "AWQ linear with base norm": (lambda d: mutate(dense_out, d, awq_with_base_norm, rehash=True), ["numeric"],
                                      f"{L1}.self_attn.q_proj: its norm does not match the scales AWQ folded"),
        "truncated shard": (lambda d: truncate(mutate(dense_out, d, lambda sd: None)), [], "truncated"),
        "edited manifest": (lambda d: edit_manifest(mutate(dense_out, d, lambda sd: None)), [],
                            "manifest was edited after build"),
        "missing tensor": (lambda d: mutate(dense_out, d, missing_tensor), [],
                           f"{L1}.mlp.down_proj.g_idx: missing from the shards"),
        "TP that cannot shard": (lambda d: mutate(dense_out, d, lambda sd: None), ["--tp", "4"],
                                 f"--tp 4: {L1}.self_attn.o_proj (awq int4 g128"),
    }
    caught = 0
    for i, (name, (make, extra, expect)) in enumerate(cases.items()):
        d = make(tmp_path / f"c{i}")
        args = list(extra)
        if "numeric" in args:
            args = ["--numeric", "--base", str(llama["base"])]
        rep = run_verify(cli, d, *args)
        text = messages(rep)
        assert not rep["ok"] and expect in text, f"{name}: {text}"
        caught += 1
    print(f"injected corruptions caught: {caught}/{len(cases)}")
    assert caught == len(cases) == 9


def test_verify_usage_errors_exit_2(cli, tmp_path, dense_out):
    r = cli("verify", tmp_path / "nope")
    assert r.exit_code == 2 and "not a directory" in r.output
    r = cli("verify", dense_out, "--numeric")
    assert r.exit_code == 2 and "--numeric needs --base BASE" in " ".join(r.output.split())
    r = cli("verify", dense_out, "--threshold", "bogus")
    assert r.exit_code == 2 and "--threshold 'bogus'" in r.output


def test_engine_sglang_binds_every_layer_at_tp1_and_tp2(dense_out, cli):
    """verify --engine sglang: SGLang's real classes build and load the mixed model through the shim on CPU, TP=1 and
    both TP=2 ranks; every layer resolves to its format's native method."""
    rep = run_verify(cli, dense_out, "--engine", "sglang", "--tp", "2", "--fast")
    assert rep["ok"], rep["findings"]
    runs = rep["engine"]["runs"]
    assert [(r["tp"], r["rank"], r["error"]) for r in runs] == [(1, 0, None), (2, 0, None), (2, 1, None)]
    assert all(r["layers"] >= 9 and r["min_capability"] >= 80 for r in runs)


def test_two_sglang_checks_at_once_meet_each_their_own_ranks(dense_out):
    """Two engine checks at once on one machine (two `verify --engine` in CI jobs side by side): each one's ranks meet
    through a file of their own (engine.rendezvous), not a TCP port picked free and bound later — which the other
    could take meanwhile (EADDRINUSE, a false engine finding)."""
    from concurrent.futures import ThreadPoolExecutor

    from mpconvert.engine import run_ranks

    with ThreadPoolExecutor(2) as pool:
        runs = [f.result() for f in [pool.submit(run_ranks, dense_out, 2, "auto") for _ in range(2)]]
    assert [[r.get("error") for r in ranks] for ranks in runs] == [[None, None], [None, None]]
    assert runs[0][0]["params"] == runs[1][0]["params"] and runs[0][1]["params"] == runs[1][1]["params"]


def test_a_rank_that_ends_early_does_not_leave_the_others_waiting():
    """SGLang's ranks wait for each other in their collectives: a rank that ends while the others run (it refused the
    model, or crashed) left them waiting — verify --engine sat ~30 minutes (its time-out) after one rank's SGLang
    refused the model at TP=2. The others now get a grace period, are then stopped, and their entries say so; every
    rank's pipes are read side by side (a rank that writes more than a pipe holds does not wait on another)."""
    import subprocess
    import sys
    import time

    from mpconvert.engine import wait_ranks

    def rank(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    waiting = rank("import time; time.sleep(600)")  # in a collective its peer will never join
    refusing = rank("import sys; sys.stderr.write('w' * 300_000); print('RESULT {\"error\": \"refused\"}')")
    start = time.monotonic()
    first, second = wait_ranks([waiting, refusing], grace_s=2)
    assert time.monotonic() - start < 60 and waiting.poll() is not None
    assert first == {"error": "stopped: still waiting 2 s after rank 1 ended (SGLang's ranks wait for each other; "
                              "that rank's entry says why it ended)"}
    assert second[0] == 'RESULT {"error": "refused"}\n' and len(second[1]) == 300_000 and second[2] == 0
    # ranks that end together are all read, none stopped
    assert [o[0] for o in wait_ranks([rank("print(1)"), rank("print(2)")], grace_s=2)] == ["1\n", "2\n"]


def test_ranks_go_when_verify_is_stopped():
    """SIGTERM (a CI time-out) while verify --engine waits for its ranks: they were left running — SGLang processes
    holding the model, waiting for each other for ever. They are stopped as verify stops."""
    import signal
    import subprocess
    import sys
    import threading

    import pytest

    from mpconvert.cli.main import Terminated, on_signal
    from mpconvert.engine import wait_ranks

    ranks = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    old = signal.signal(signal.SIGTERM, on_signal)  # as main() installs it
    try:
        threading.Timer(1.0, signal.raise_signal, (signal.SIGTERM,)).start()
        with pytest.raises(Terminated):
            wait_ranks(ranks)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert [r.wait(timeout=10) for r in ranks] == [-signal.SIGKILL] * 2


def test_engine_sglang_reports_what_sglang_refuses(moe, cli, tmp_path):
    """GPTQ MoE experts in the model's bf16: every static check passes, but SGLang's GPTQ-Marlin MoE runs fp16 only —
    the engine check fails (exit 1) naming the layer and the fix, and passes with --dtype float16."""
    recipe = write_recipe(tmp_path, moe, {"gptq": "gptq", "int8": "ct-w8a8"}, "gptq",
                          '- {match: "self_attn.*", source: int8}')
    build(cli, recipe, tmp_path / "out")
    assert run_verify(cli, tmp_path / "out", "--fast")["ok"]
    rep = run_verify(cli, tmp_path / "out", "--fast", "--engine", "sglang")
    assert not rep["ok"]
    [f] = rep["findings"]
    assert f["check"] == "engine" and "model.layers.0.mlp.experts is GPTQ MoE" in f["message"]
    assert "--dtype float16" in f["message"]
    assert run_verify(cli, tmp_path / "out", "--fast", "--engine", "sglang", "--dtype", "float16")["ok"]


def test_engine_check_flags_a_float_copy_in_a_quantized_unit():
    """The engine comparison itself: a weight-sized bf16 parameter in a GPTQ unit is a dequantized copy."""
    from mpconvert.engine import compare
    from mpconvert.verify import Report

    from types import SimpleNamespace

    from mpconvert.manifest import UnitEntry

    gptq = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    manifest = SimpleNamespace(layout="mpconvert", units={"model.layers.0.mlp.down_proj": UnitEntry(
        format="gptq", params=gptq, members=["model.layers.0.mlp.down_proj"])})
    ok = {"quant_config": "MpconvertConfig",
          "methods": {"model.layers.0.mlp.down_proj": ["GPTQMarlinLinearMethod", "GPTQMarlinLinearScheme"]},
          "untouched": [], "params": {"model.layers.0.mlp.down_proj.qweight": ["torch.int32", [64, 256], ""],
                                      "model.layers.0.mlp.down_proj.scales": ["torch.bfloat16", [4, 256], ""]}}
    rep = Report("x")
    compare(manifest, ok, "tp=1 rank 0", rep)
    assert rep.findings == []
    bad = {**ok, "params": {**ok["params"], "model.layers.0.mlp.down_proj.weight": ["torch.bfloat16", [256, 512], ""]}}
    compare(manifest, bad, "tp=1 rank 0", rep)
    [f] = rep.findings
    assert f.where.endswith("down_proj.weight") and "dequantized copy" in f.message
    compare(manifest, {**ok, "methods": {"model.layers.0.mlp.down_proj": ["MoeWNA16Method", "x"]}}, "tp=1 rank 0",
            rep)
    assert "expected GPTQMarlinLinearMethod" in rep.findings[-1].message


def test_the_report_is_the_same_with_the_data_checks_in_a_child(dense_out, tmp_path, monkeypatch):
    """verify reads tensor data (digests, NaN scan, value invariants) in a child process while it checks the manifest
    and the splits here: finding for finding, in order, its report is the one the checks give in turn."""
    from dataclasses import asdict

    from mpconvert import forked
    from mpconvert.rules import Parallel
    from mpconvert.verify import verify

    def several(sd):
        flip_byte(sd)  # the bytes changed: a digest finding
        sd[f"{L1}.mlp.down_proj.scales"].view(-1)[0] = -1.0  # a value finding (and a digest one)
        sd[f"{L0}.input_layernorm.weight"].view(-1)[0] = float("nan")  # a NaN finding, and the norm's value one

    d = mutate(dense_out, tmp_path / "d", several)
    beside = verify(d, Parallel(4))
    monkeypatch.setattr(forked, "usable_cores", lambda: 1)
    in_turn = verify(d, Parallel(4))
    assert [(f.check, f.where) for f in in_turn.findings] == [  # the order of the checks, run in turn
        ("structure", f"{L0}.input_layernorm.weight"), ("structure", f"{L1}.mlp.down_proj.scales"),
        ("structure", f"{L1}.mlp.up_proj.qweight"),  # digests, in table order
        ("scheme", f"{L0}.input_layernorm.weight"),  # the NaN scan
        ("scheme", f"{L0}.input_layernorm"), ("scheme", f"{L1}.mlp.down_proj"),  # values, after the manifest's
        ("tp", f"{L1}.self_attn.o_proj")]
    assert [asdict(f) for f in beside.findings] == [asdict(f) for f in in_turn.findings]
    assert beside.memory == in_turn.memory
    fast = verify(d, Parallel(4), hash_tensors=False)
    assert [asdict(f) for f in fast.findings] == [asdict(f) for f in in_turn.findings
                                                  if not f.message.startswith(("sha256", "holds NaN"))]


def test_a_broken_manifest_leaves_no_child_behind(dense_out, tmp_path):
    """verify starts hashing in a child process before it reads the manifest: when the manifest turns out broken,
    the report says so and the child is gone (killed and reaped), not left running or a zombie."""
    import os

    from mpconvert.verify import verify

    d = Path(shutil.copytree(dense_out, tmp_path / "d"))
    (d / MANIFEST).write_text("{not json")
    rep = verify(d)
    assert [f.check for f in rep.findings][:2] == ["manifest", "config"]
    with pytest.raises(ChildProcessError):  # no child of this process, running or not reaped
        os.waitpid(-1, os.WNOHANG)
