"""Which norm a linear reads depends on the decoder block's layout (layout.stage_norms), and a folded-scale producer
folds into that norm: real producers' outputs of a parallel block (Cohere: one input_layernorm before attention and
the MLP, smoothed by llm-compressor's SmoothQuant for q/k/v and gate/up at once), of sandwich blocks (Gemma 2:
AutoAWQ folds gate/up into pre_feedforward_layernorm; post_attention_layernorm normalizes attention's output; Gemma 3
from llm-compressor, whose (1 + weight) norms it rounds) and of a post-norm block (OLMo 2: no norm before a block)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpconvert import choose
from mpconvert.layout import stage_norms

from helpers import build, edited_source, fails, loaded, refusal, write_recipe

SQ = {"sq": "ct-w8a8-smooth", "fp8": "ct-fp8-dynamic"}
LICENSES = Path("/usr/share/common-licenses")


@pytest.mark.parametrize("names, want", [
    # pre-norm (Llama), parallel (Cohere), sandwich (Gemma 2/3), post-norm (OLMo 2): the norm each stage reads
    (["input_layernorm", "post_attention_layernorm"], {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}),
    (["input_layernorm"], {"attn_in": "input_layernorm", "mlp_in": "input_layernorm"}),
    (["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"],
     {"attn_in": "input_layernorm", "mlp_in": "pre_feedforward_layernorm"}),
    (["post_attention_layernorm", "post_feedforward_layernorm"], {}),
])
def test_the_norm_each_stage_reads(names, want):
    got = stage_norms([f"model.layers.3.{n}" for n in names] + ["model.norm", "model.layers.3.self_attn.q_norm"])
    assert got == {(3, stage): f"model.layers.3.{n}" for stage, n in want.items()}


@pytest.mark.parametrize("rules, smoothed, plain", [
    ('- {match: "self_attn.*", source: sq}', "k_proj", "gate_proj"),
    ('- {match: "mlp.*", source: sq}', "gate_proj", "k_proj"),
])
def test_a_parallel_block_keeps_attention_and_mlp_on_one_fold(rules, smoothed, plain, cohere, cli, tmp_path):
    """Cohere's input_layernorm feeds attention and the MLP: SmoothQuant divided it by one scale and multiplied q/k/v
    and gate/up by it. Either half from the smoothed source beside the other half from another was built silently
    (logits cosine 0.49 / 0.69 against the base, measured) — now refused, naming both consumers."""
    r = write_recipe(tmp_path, cohere, SQ, "fp8", rules)
    text = fails(cli, tmp_path, r, match="folded scales: model.layers.0.input_layernorm differs between the sources")
    assert f"{smoothed} from 'sq'" in text and f"{plain} from 'fp8'" in text


def test_a_parallel_block_served_from_one_fold(cohere, cli, tmp_path):
    """q/k/v and gate/up from the smoothed source, o_proj and down_proj (which read no norm) from FP8: builds with the
    smoothed norm, verify --numeric holds every module to its band (compared through the norm it reads), and
    SGLang's Cohere model binds and loads it on CPU."""
    rules = """
    - {match: "self_attn.[qkv]_proj", source: sq}
    - {match: "mlp.gate_proj", source: sq}
    - {match: "mlp.up_proj", source: sq}
    """
    out = tmp_path / "out"
    m = build(cli, write_recipe(tmp_path, cohere, SQ, "fp8", rules), out)
    assert m["modules"]["model.layers.0.input_layernorm"]["source"] == "sq"
    assert m["modules"]["model.layers.0.mlp.down_proj"]["format"] == "fp8"
    r = cli("verify", out, "--numeric", "--base", cohere["base"], "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and report["findings"] == [], report["findings"]
    [rank] = loaded(out)
    methods = rank["methods"]
    assert methods["model.layers.0.self_attn.qkv_proj"][0] == "W8A8Int8LinearMethod"
    assert methods["model.layers.0.mlp.gate_up_proj"][0] == "W8A8Int8LinearMethod"
    assert methods["model.layers.0.mlp.down_proj"][0] == "CompressedTensorsLinearMethod"


def test_a_smoothed_w8a8_source_is_held_to_its_band(llama, cli, tmp_path):
    """llm-compressor's W8A8 with SmoothQuant records no fold in its config; its q/k/v and gate/up were quantized
    against the smoothed norms. verify --numeric compared them with the base's unsmoothed weights and failed every one
    of a correct build (errors 3.9–4.3 against a band of 0.01); now through the norm they read, as AWQ's."""
    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, llama, {"sq": "ct-w8a8-smooth"}, "sq"), out)
    r = cli("verify", out, "--numeric", "--base", llama["base"], "--json")
    assert r.exit_code == 0, r.output
    errors = json.loads(r.output)["numeric"]["module_error_max"]["int8"]
    assert errors["ratio_to_rtn"] < 1.5, errors


def test_a_sandwich_block_folds_into_pre_feedforward_layernorm(sandwich, cli, tmp_path):
    """Gemma 2: AutoAWQ folded gate/up's scales into pre_feedforward_layernorm, the norm the MLP reads. The AWQ MLP
    beside bf16 attention was refused ("changed pre_feedforward_layernorm, which mpconvert cannot couple"); now the
    norm goes with its MLP, post_attention_layernorm (attention's output norm) stays the base's, and every module
    is within its band through the norm it reads."""
    out = tmp_path / "out"
    m = build(cli, write_recipe(tmp_path, sandwich, {"awq": "autoawq"}, "base", '- {match: "mlp.*", source: awq}'),
              out)
    mods = m["modules"]
    assert mods["model.layers.0.pre_feedforward_layernorm"]["source"] == "awq"
    assert mods["model.layers.0.post_attention_layernorm"]["source"] == "base"
    assert mods["model.layers.0.input_layernorm"]["source"] == "base"
    r = cli("verify", out, "--numeric", "--base", sandwich["base"], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["numeric"]["module_error_max"]["awq"]["ratio_to_rtn"] < 3.0


def test_plan_weighs_a_parallel_block_as_one_fold(cohere, cli, tmp_path):
    """plan measured the smoothed source's q/k/v and gate/up without the norm SmoothQuant changed (no format records
    that fold), so it never chose them; a parallel block's attention and MLP are now one group, measured with the
    smoothed norm, and the recipe plan writes builds."""
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe

    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {cohere['base']}\nsources:\n  sq: {cohere['ct-w8a8-smooth']}\n"
                   f"  fp8: {cohere['ct-fp8-dynamic']}\n")
    c = choose.candidates(Inputs.open(load_recipe(src, sources_only=True)))
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn.qkv_proj", f"model.layers.{layer}.mlp.gate_up_proj"
        assert [s.folds for s in c.units[attn]] == [False, False, True]  # base, fp8, sq
        assert any(set(group) >= {attn, mlp} for _, group in c.groups), c.groups
        assert [g for _, g in c.groups if f"model.layers.{layer}.self_attn.o_proj" in g] == [
            (f"model.layers.{layer}.self_attn.o_proj",)]  # SmoothQuant folds nothing into o_proj
    r = cli("plan", src, "--budget", "0.7x", "--calib", LICENSES / "GPL-3", "-o", tmp_path / "r.yaml",
            "--calib-tokens", 256)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    for layer in range(2):
        units = report["units"]
        assert units[f"model.layers.{layer}.self_attn.qkv_proj"]["source"] == \
            units[f"model.layers.{layer}.mlp.gate_up_proj"]["source"]
    b = cli("build", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert b.exit_code == 0, b.output


def test_a_model_class_that_drops_layer_names(sandwich, cli, tmp_path):
    """SGLang 0.5.17's Gemma 2 builds its decoder layers without their prefix: the shim is asked for the format of
    'mlp.gate_up_proj', no layer named. Where every layer's unit of that name shares one format it is bound (the AWQ
    MLP in every layer serves on CPU); where they differ the shim refuses, naming two — before, the unquantized default
    met the AWQ tensors at load (a KeyError deep in SGLang's loader)."""
    every = tmp_path / "every"
    build(cli, write_recipe(tmp_path, sandwich, {"awq": "autoawq"}, "base", '- {match: "mlp.*", source: awq}'), every)
    [rank] = loaded(every)
    assert rank["methods"]["model.layers.1.mlp.gate_up_proj"][0] == "AWQLinearMethod"  # (by module path)
    one = tmp_path / "one"
    build(cli, write_recipe(tmp_path, sandwich, {"awq": "autoawq"}, "base",
                            '- {match: "mlp.*", layers: 0, source: awq}'), one)
    why = " ".join(refusal(one).split())
    assert "asked for the format of 'mlp.gate_up_proj' without its layer's name" in why, why
    assert "model.layers.0.mlp.gate_up_proj is awq, model.layers.1.mlp.gate_up_proj unquantized" in why, why


GEMMA3 = {"fp8": "ct-fp8-dynamic", "int8": "ct-w8a8", "w4": "ct-w4a16"}


def test_gemma3_llm_compressor_sources_mix(gemma3, cli, tmp_path):
    """Gemma 3's norms scale by (1 + weight). llm-compressor 0.14 turns each into a plain norm for calibration and
    back, rounding to bfloat16 at each step, so its FP8, W8A8 and W4A16 outputs hold every norm one ulp off the
    base's in about half its values — and build refused every mix of them ("changed post_attention_layernorm, which
    mpconvert cannot couple"). That round trip is no fold: the mix builds with the base's exact norms, is within
    every band, plan does not take the sources for folded-scale ones, and SGLang's own Gemma3ForCausalLM binds each
    unit to its format's method at TP=1 and TP=2."""
    from mpconvert.plan import Inputs
    from mpconvert.recipe import load_recipe

    rules = """
    - {match: "self_attn.*", source: fp8}
    - {match: "mlp.down_proj", source: int8}
    """
    out = tmp_path / "out"
    m = build(cli, write_recipe(tmp_path, gemma3, GEMMA3, "w4", rules), out, "--tp", "2")
    norms = {n: mod["source"] for n, mod in m["modules"].items() if n.endswith("norm")}
    assert len(norms) == 13 and set(norms.values()) == {"base"}, norms  # 6 per layer (q_norm, k_norm) + model.norm
    r = cli("verify", out, "--numeric", "--base", gemma3["base"], "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.output)["numeric"]["module_error_max"]) == {"fp8", "int8", "wna16"}
    for rank in [*loaded(out), *loaded(out, 2)]:
        methods = rank["methods"]
        assert methods["model.layers.0.self_attn.qkv_proj"][1] == "CompressedTensorsW8A8Fp8"
        assert methods["model.layers.0.mlp.gate_up_proj"][1] == "CompressedTensorsWNA16"
        assert methods["model.layers.1.mlp.down_proj"][0] == "W8A8Int8LinearMethod"
    src = tmp_path / "sources.yaml"
    src.write_text(f"base: {gemma3['base']}\nsources:\n" + "".join(f"  {k}: {gemma3[v]}\n" for k, v in GEMMA3.items()))
    c = choose.candidates(Inputs.open(load_recipe(src, sources_only=True)))
    assert not any(s.folds for servers in c.units.values() for s in servers)


def _offset_round_trip(w):
    """llm-compressor's round trip of an offset norm's weight: (1 + w) in bfloat16, minus 1, in bfloat16."""
    import torch

    return ((w.float() + 1).to(torch.bfloat16).float() - 1).to(torch.bfloat16)


def test_only_an_offset_norms_round_trip_counts_as_unchanged(gemma3, llama, cli, tmp_path):
    """The allowance is exactly the round trip, and only where norms scale by (1 + weight): a Gemma 3 source whose
    final norm moved further, and a Llama source (plain norms) whose final norm holds the base's after that round
    trip, are refused as changed norms nothing couples."""
    def nudged(sd):
        sd["model.norm.weight"] = sd["model.norm.weight"] + 0.0625

    fp8 = edited_source(gemma3["ct-fp8-dynamic"], tmp_path / "gemma3-fp8", nudged)
    recipe = write_recipe(tmp_path, {**gemma3, "fp8": fp8}, {"w4": "ct-w4a16", "f": "fp8"}, "w4",
                          '- {match: "self_attn.*", source: f}')
    fails(cli, tmp_path, recipe, match="source 'f' changed model.norm, which no linear reads")

    def round_tripped(sd):
        w = sd["model.norm.weight"]
        sd["model.norm.weight"] = _offset_round_trip(w)
        assert not sd["model.norm.weight"].equal(w)

    fp8 = edited_source(llama["ct-fp8-dynamic"], tmp_path / "llama-fp8", round_tripped)
    recipe = write_recipe(tmp_path, {**llama, "fp8": fp8}, {"gptq": "gptq", "f": "fp8"}, "gptq",
                          '- {match: "self_attn.*", source: f}')
    fails(cli, tmp_path, recipe, match="source 'f' changed model.norm, which no linear reads")


def test_a_gemma3_smoothquant_of_the_wrong_norm_is_refused(gemma3, cli, tmp_path):
    """llm-compressor 0.14 smooths a Gemma 3 with its default mappings: gate/up against post_attention_layernorm —
    which normalizes attention's *output* — so the source's gate/up columns are scaled ~9× while the norm they read
    (pre_feedforward_layernorm) is unchanged: a broken model. No build takes it."""
    recipe = write_recipe(tmp_path, gemma3, {"sq": "ct-w8a8-smooth"}, "sq")
    fails(cli, tmp_path, recipe, match="source 'sq' changed model.layers.0.post_attention_layernorm, which no linear "
                                       "reads")


@pytest.mark.parametrize("fold, ok", [("offset", True), ("plain", False)])
def test_a_gemma_norm_is_compared_through_one_plus_its_weight(fold, ok, gemma3, cli, tmp_path):
    """A Gemma norm scales by (1 + weight). A smoothing fold moved into layer 0's FP8 q/k/v columns (×s, s from 1 to
    1.5, requantized per channel as the producer would) and out of its input_layernorm is right when the norm's
    *gain* is divided — weight' = (1 + weight)/s − 1, as AutoAWQ and llm-compressor fold a Gemma — and wrong when
    the weight itself is (weight/s: the served attention reads other activations). verify --numeric compared
    weight·W as for a Llama: it failed the right fold and passed the wrong one; it compares (1 + weight)·W now."""
    import torch

    from helpers import mutate, run_verify

    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, gemma3, {"fp8": "ct-fp8-dynamic"}, "base",
                            '- {match: "self_attn.*", layers: 0, source: fp8}'), out)
    s = 1 + 0.5 * torch.rand(256, generator=torch.Generator().manual_seed(0))

    def smoothed(sd):
        layer = "model.layers.0."
        n = sd[layer + "input_layernorm.weight"].float()
        sd[layer + "input_layernorm.weight"] = ((1 + n) / s - 1 if fold == "offset" else n / s).bfloat16()
        for p in ("q_proj", "k_proj", "v_proj"):
            key = f"{layer}self_attn.{p}.weight"
            w = sd[key].float() * sd[key + "_scale"].float() * s  # FP8 per output channel, columns ×s
            scale = w.abs().amax(1, keepdim=True) / 448
            sd[key] = (w / scale).to(torch.float8_e4m3fn)
            sd[key + "_scale"] = scale.to(sd[key + "_scale"].dtype)

    rep = run_verify(cli, mutate(out, tmp_path / fold, smoothed, rehash=True), "--numeric", "--base", gemma3["base"])
    found = {f["where"] for f in rep["findings"] if f["check"] == "numeric"}
    if ok:
        assert rep["ok"], rep["findings"]
    else:
        assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"} <= found, rep["findings"]


OLMO2 = {"fp8": "ct-fp8-dynamic", "int8": "ct-w8a8", "w4": "ct-w4a16", "gptq": "gptq"}


def test_a_post_norm_block_mix_serves(olmo2, cli, tmp_path):
    """OLMo 2's post-norm block (no norm before attention or the MLP; post_attention_layernorm and
    post_feedforward_layernorm normalize the outputs; q_norm/k_norm span all heads) from llm-compressor and
    gptqmodel: FP8 and W4A16 attention, Int8 down_proj, GPTQ gate/up — no norm couples to any of them, every norm is
    the base's, the mix is within every band, and SGLang's own Olmo2ForCausalLM binds each unit at TP=1 and TP=2
    (its q_norm/k_norm split by rank)."""
    rules = """
    - {match: "self_attn.*", layers: 0, source: fp8}
    - {match: "self_attn.*", layers: 1, source: w4}
    - {match: "mlp.down_proj", source: int8}
    """
    out = tmp_path / "out"
    m = build(cli, write_recipe(tmp_path, olmo2, OLMO2, "gptq", rules), out, "--tp", "2")
    assert {mod["source"] for n, mod in m["modules"].items() if n.endswith("norm")} == {"base"}
    r = cli("verify", out, "--numeric", "--base", olmo2["base"], "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.output)["numeric"]["module_error_max"]) >= {"fp8", "wna16", "int8", "gptq"}
    for rank in [*loaded(out), *loaded(out, 2)]:
        methods = rank["methods"]
        assert methods["model.layers.0.self_attn.qkv_proj"][1] == "CompressedTensorsW8A8Fp8"
        assert methods["model.layers.1.self_attn.qkv_proj"][1] == "CompressedTensorsWNA16"
        assert methods["model.layers.0.mlp.down_proj"][0] == "W8A8Int8LinearMethod"
        assert methods["model.layers.0.mlp.gate_up_proj"][0] == "GPTQMarlinLinearMethod"


def test_an_awq_folded_into_a_post_norm_blocks_output_norm_is_refused(olmo2, cli, tmp_path):
    """gptqmodel 7.6 quantizes OLMo 2 as a Llama: its AWQ folds gate/up's scales into post_attention_layernorm —
    which in OLMo 2 normalizes attention's output, not the MLP's input (there is none) — so its gate/up columns are
    scaled while nothing divides what they read: not the base's function. No build takes it, alone or mixed."""
    alone = write_recipe(tmp_path, olmo2, {"awq": "awq"}, "awq")
    fails(cli, tmp_path, alone, match="source 'awq' changed model.layers.0.post_attention_layernorm, which no linear "
                                      "reads")
    mixed = write_recipe(tmp_path, olmo2, {"awq": "awq", "gptq": "gptq"}, "gptq", '- {match: "mlp.*", source: awq}')
    fails(cli, tmp_path, mixed, match="changed model.layers.0.post_attention_layernorm")
