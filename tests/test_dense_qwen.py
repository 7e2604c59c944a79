"""Dense Qwen2 and Qwen3 (the small ones, as shipped: a head tied to the embedding; Qwen2 with a bias on q/k/v,
Qwen3 with q_norm/k_norm), from real producers' outputs: mixed, verified against the base and bound by SGLang's own
model classes on CPU. And what they exposed: AWQ's second fold (up_proj→down_proj, v_proj→o_proj), which verify
--numeric now reads off the pair's other side (a correct AWQ MLP of the Qwen2 fixture failed its band before); a
source whose bias differs from the base's; a tied head saved as a tensor of its own."""
from __future__ import annotations

import json

import pytest

from helpers import build, edited_source, fails, loaded, messages, mutate, resign, run_verify, write_recipe

SOURCES = {"fp8": "ct-fp8-dynamic", "int8": "ct-w8a8", "sq": "ct-w8a8-smooth", "gptq": "gptq", "awq": "awq"}


def fixtures_of(arch: str) -> dict:
    """One of the two models' fixtures (for the tests about one of them; the rest take both through dense_qwen)."""
    from conftest import made_by
    from fixtures.factory import SCRIPTS

    return made_by(SCRIPTS[arch])


def served(out):
    [rank] = loaded(out)
    return rank["methods"]


def test_a_dense_qwen_mix_serves(dense_qwen, cli, tmp_path):
    """FP8 attention (Qwen2: its q/k/v bias along), Int8 down_proj, GPTQ gate/up: byte-exact, within every band of
    the base, no lm_head written (tied), and SGLang's Qwen2/Qwen3 binds each unit to its format's method."""
    out = tmp_path / "out"
    rules = """
    - {match: "self_attn.*", source: fp8}
    - {match: "mlp.down_proj", source: int8}
    """
    m = build(cli, write_recipe(tmp_path, dense_qwen, SOURCES, "gptq", rules), out)
    mods = m["modules"]
    assert "lm_head" not in mods and json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    q = mods["model.layers.0.self_attn.q_proj"]
    if json.loads((dense_qwen["base"] / "config.json").read_text())["model_type"] == "qwen2":
        assert set(q["tensors"]) == {"weight", "weight_scale", "bias"}  # Qwen2: the bias travels with its linear
    else:
        assert mods["model.layers.0.self_attn.q_norm"]["source"] == "base"  # Qwen3's per-head norms
    rep = run_verify(cli, out, "--numeric", "--base", dense_qwen["base"])
    assert rep["ok"], messages(rep)
    assert set(rep["numeric"]["module_error_max"]) == {"fp8", "int8", "gptq"}
    methods = served(out)
    assert methods["model.layers.1.self_attn.qkv_proj"][0] == "CompressedTensorsLinearMethod"
    assert methods["model.layers.1.mlp.down_proj"][0] == "W8A8Int8LinearMethod"
    assert "GPTQ" in methods["model.layers.1.mlp.gate_up_proj"][0]


def test_a_smoothed_attention_beside_another_mlp_serves(dense_qwen, cli, tmp_path):
    """SmoothQuant's attention (its input_layernorm smoothed) beside a GPTQ MLP (the base's post_attention_layernorm):
    the two folds are in different norms, so the mix keeps both; verify --numeric compares q/k/v through the
    smoothed norm."""
    out = tmp_path / "out"
    m = build(cli, write_recipe(tmp_path, dense_qwen, SOURCES, "gptq", '- {match: "self_attn.*", source: sq}'), out)
    assert m["modules"]["model.layers.0.input_layernorm"]["source"] == "sq"
    assert m["modules"]["model.layers.0.post_attention_layernorm"]["source"] == "base"
    rep = run_verify(cli, out, "--numeric", "--base", dense_qwen["base"])
    assert rep["ok"], messages(rep)
    assert served(out)["model.layers.0.self_attn.qkv_proj"][0] == "W8A8Int8LinearMethod"


@pytest.fixture
def awq_out(dense_qwen, cli, tmp_path):
    """AWQ everywhere but layer 1's attention (FP8): AWQ's MLP pairs stay whole."""
    out = tmp_path / "awq"
    build(cli, write_recipe(tmp_path, dense_qwen, SOURCES, "awq", '- {match: "self_attn.*", layers: 1, source: fp8}'),
          out)
    return out


def test_awq_pairs_are_compared_through_their_fold(awq_out, dense_qwen, cli):
    """up_proj's rows carry the scale AWQ moved into down_proj's columns (0.45–2.17 on the Qwen2 fixture): compared
    raw, a correct up_proj failed its band (0.435 against 0.308). Read off down_proj, the scale brings every AWQ
    module — down_proj and o_proj, unchecked before, among them — near round-to-nearest's error."""
    rep = run_verify(cli, awq_out, "--numeric", "--base", dense_qwen["base"])
    assert rep["ok"], messages(rep)
    assert rep["numeric"]["module_error_max"]["awq"]["ratio_to_rtn"] < 2.0, rep["numeric"]["module_error_max"]
    assert served(awq_out)["model.layers.0.mlp.gate_up_proj"][0] == "AWQLinearMethod"


@pytest.mark.parametrize("module", ["mlp.down_proj", "self_attn.o_proj"])
def test_an_awq_consumer_with_wrong_scales_is_found(awq_out, dense_qwen, cli, tmp_path, module):
    """A consumer of AWQ's second fold (down_proj; o_proj, whose fold GQA's shapes rule out) with half its output
    channels' scales 1.5× — bytes and manifest consistent, so only the numeric check can see it. These modules were
    not compared before; compared through a scale read off themselves, the Qwen2 down_proj's fault was fitted away
    (it passed); read off its partner, it is named."""
    name = f"model.layers.0.{module}.scales"

    def scale_half(sd):
        s = sd[name].clone()
        s[:, : s.shape[1] // 2] *= 1.5
        sd[name] = s

    bad = mutate(awq_out, tmp_path / "bad", scale_half, rehash=True)
    rep = run_verify(cli, bad, "--numeric", "--base", dense_qwen["base"])
    assert not rep["ok"]
    assert f"model.layers.0.{module}: weight error" in messages(rep), messages(rep)


def test_plan_on_a_dense_qwen3(cli, tmp_path):
    """plan over five real sources of a dense Qwen3 (FP8, Int8, SmoothQuant Int8, GPTQ, AWQ) under a budget: the
    recipe it writes builds, and the build passes verify --numeric against the base. (The Qwen2 fixture's word-level
    tokenizer is read by transformers 5.12 as a Qwen2 BPE tokenizer, which yields no tokens: plan refuses its
    calibration text, rightly; a real Qwen2 ships its own tokenizer files.)"""
    fx = fixtures_of("qwen3")
    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {fx['base']}\nsources:\n" + "".join(f"  {n}: {fx[k]}\n" for n, k in SOURCES.items()))
    r = cli("plan", src, "--budget", "0.45x", "--calib", "/usr/share/common-licenses/GPL-3", "--calib-tokens", 256,
            "-o", tmp_path / "plan.yaml")
    assert r.exit_code == 0, r.output
    build(cli, tmp_path / "plan.yaml", tmp_path / "out")
    rep = run_verify(cli, tmp_path / "out", "--numeric", "--base", fx["base"])
    assert rep["ok"], messages(rep)


@pytest.mark.parametrize("arch, change, says", [
    ("qwen2", "drop", "stores model.layers.0.self_attn.q_proj without the bias the base has"),
    ("qwen3", "add", "stores model.layers.0.self_attn.o_proj with a bias the base has not"),
])
def test_a_source_whose_bias_differs_from_the_base_is_refused(cli, tmp_path, arch, change, says):
    """A producer that dropped a linear's bias (or added one): built, the module was written without it, verify and
    even verify --numeric (which starts from the base's weights) passed, and SGLang would have served that slice of
    qkv_proj's bias uninitialized. Now refused in one line; plan does not offer such a source for the unit."""
    import torch

    from mpconvert import choose
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe

    dense_qwen = fixtures_of(arch)

    def edit(sd):
        if change == "drop":
            sd.pop("model.layers.0.self_attn.q_proj.bias")
        else:
            sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(256, dtype=torch.bfloat16)

    odd = edited_source(dense_qwen["ct-fp8-dynamic"], tmp_path / "odd", edit)
    fx = {**dense_qwen, "odd": odd}
    fails(cli, tmp_path, write_recipe(tmp_path, fx, {"odd": "odd", "gptq": "gptq"}, "gptq",
                                      '- {match: "self_attn.*", source: odd}'), match=says)
    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {fx['base']}\nsources:\n  odd: {odd}\n  fp8: {fx['ct-fp8-dynamic']}\n")
    c = choose.candidates(Inputs.open(load_recipe(src, sources_only=True)))
    unit = "model.layers.0.self_attn." + ("qkv_proj" if change == "drop" else "o_proj")
    assert [s.source for s in c.units[unit]] == ["base", "fp8"]
    assert [s.source for s in c.units["model.layers.1.self_attn.o_proj"]] == ["base", "fp8", "odd"]


def test_verify_finds_a_bias_gone_from_a_built_directory(cli, tmp_path):
    """A built Qwen2 whose q_proj bias went missing after build (manifest, index and shard consistent without it):
    verify names the module — SGLang fuses q/k/v with one bias."""
    dense_qwen = fixtures_of("qwen2")

    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, dense_qwen, SOURCES, "gptq", '- {match: "self_attn.*", source: fp8}'), out)
    name = "model.layers.1.self_attn.q_proj.bias"
    bad = mutate(out, tmp_path / "bad", lambda sd: sd.pop(name, None), rehash=False)
    m = json.loads((bad / "mpconvert_manifest.json").read_text())
    t = m["tensors"]
    r = t["name"].index(name)
    for col in ("name", "dtype", "shape", "sha256", "shard"):
        del t[col][r]
    for col in ("rewrite", "renamed_from"):
        t[col] = {str(int(k) - (int(k) > r)): v for k, v in t[col].items() if int(k) != r}
    for mod in m["modules"].values():
        mod["tensors"] = {s: x - (x > r) for s, x in mod["tensors"].items() if x != r}
    m["totals"]["bytes"] -= 2 * 256
    index = json.loads((bad / "model.safetensors.index.json").read_text()) if \
        (bad / "model.safetensors.index.json").exists() else None
    if index is not None:
        del index["weight_map"][name]
        index["metadata"]["total_size"] -= 2 * 256
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    resign(bad, m)
    rep = run_verify(cli, bad)
    assert not rep["ok"]
    assert [f["where"] for f in rep["findings"]] == ["model.layers.1.self_attn.q_proj"], messages(rep)
    assert "has no bias but model.layers.1.self_attn.v_proj has one" in messages(rep)


@pytest.mark.parametrize("head, says", [
    ("copy", None),
    ("other", "module 'lm_head' is not in the base model"),
])
def test_a_tied_head_saved_as_a_tensor(cli, tmp_path, head, says):
    """Some exporters write a tied model's lm_head.weight beside the embedding it is tied to. Such a source was
    refused outright ('lm_head is not in the base model'); a copy of its embedding is now nothing to take (the output
    ties its head as the base does; SGLang skips that tensor for a tied model) and the source serves as any other. A
    head of other values is no copy: still refused."""
    fx = fixtures_of("qwen2")

    def add_head(sd):
        e = sd["model.embed_tokens.weight"]
        sd["lm_head.weight"] = e.clone() if head == "copy" else (e * 2).clone()

    fx["odd"] = edited_source(fx["ct-fp8-dynamic"], tmp_path / "odd", add_head)
    recipe = write_recipe(tmp_path, fx, {"odd": "odd", "gptq": "gptq"}, "gptq", '- {match: "self_attn.*", source: odd}')
    if says:
        fails(cli, tmp_path, recipe, match=says)
        return
    out = tmp_path / "out"
    m = build(cli, recipe, out)
    assert "lm_head" not in m["modules"] and m["modules"]["model.embed_tokens"]["source"] == "base"
    assert served(out)["model.layers.0.self_attn.qkv_proj"][0] == "CompressedTensorsLinearMethod"
