"""Formats in (issue 17): compressed-tensors pack-quantized W4A16 / W8A16 and asymmetric GPTQ as sources.

Every check is on real producer output: llm-compressor (round-to-nearest and GPTQ), gptqmodel; the reference
dequantizers are compared bit for bit with the producers' own decompression; builds are loaded by SGLang's real
classes on CPU and every layer must get its native method.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file

from fixtures.factory import HERE, autoawq_python, fixture_python
from helpers import build, check_faithful, copy, fails, header_of, loaded, put_header, write_recipe
from mpconvert.formats import FORMATS
from mpconvert.formats.gptq import v1_to_v2_words
from mpconvert.formats.intpack import pack_cols, unpack_cols
from mpconvert.numeric import dequantize
from mpconvert.safetensors_io import load_tensor
from mpconvert.sources import open_source

CT_KINDS = ("ct-w4a16", "ct-w4a16-asym", "ct-w8a16-channel", "ct-gptq-asym-weight")


def _ct_decompressed(path, model_type: str):
    """(module, compressed-tensors' own decompression, mpconvert's) for every packed module of a checkpoint."""
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(cfg["config_groups"]["group_0"])
    src = open_source("x", path, model_type)
    for name, view in src.modules.items():
        if view.scheme.format != "wna16":
            continue
        t = {s: load_tensor(i) for s, i in view.tensors.items()}
        theirs = PackedQuantizationCompressor.decompress(t, scheme)["weight"]
        ours = dequantize(view.scheme, view.tensors, *t["weight_shape"].tolist())
        yield name, theirs, ours


@pytest.mark.parametrize("kind", CT_KINDS)
def test_pack_quantized_dequantizes_as_compressed_tensors_does(llama, kind):
    n = 0
    for name, theirs, ours in _ct_decompressed(llama[kind], "llama"):
        assert torch.equal(ours.to(theirs.dtype), theirs), f"{kind} {name}"
        n += 1
    assert n == 14  # every linear but lm_head


def test_pack_quantized_experts_and_the_real_model(moe, real):
    for path, model_type, count in ((moe["ct-w4a16"], "qwen3_moe", 2 * (4 + 8 * 3)),
                                    (moe["ct-w4a16-asym"], "qwen3_moe", 2 * (4 + 8 * 3)),
                                    (real["ct-gptq-w4a16-g64"], "llama", 30 * 7),
                                    (real["ct-w4a16-asym-g64"], "llama", 30 * 7)):
        seen = 0
        for name, theirs, ours in _ct_decompressed(path, model_type):
            assert torch.equal(ours.to(theirs.dtype), theirs), f"{path.name} {name}"
            seen += 1
        assert seen == count, path.name


def test_schemes_read_from_the_producers_configs(llama, real):
    seen = {k: {v.scheme.describe() for v in open_source("x", llama[k], "llama").modules.values()
                if v.scheme.format != "unquantized"} for k in CT_KINDS}
    assert seen == {"ct-w4a16": {"wna16 int4 g128"}, "ct-w4a16-asym": {"wna16 int4 g128 asym"},
                    "ct-w8a16-channel": {"wna16 int8 channel"}, "ct-gptq-asym-weight": {"wna16 int4 g128 asym"}}
    view = open_source("x", real["ct-gptq-w4a16-g64"], "llama").modules["model.layers.3.mlp.down_proj"]
    assert view.scheme.params == {"bits": 4, "strategy": "group", "group_size": 64, "symmetric": True,
                                  "actorder": "weight"}


@pytest.mark.parametrize("kind", ["gptq-asym", "gptq-asym-v2"])
def test_asymmetric_gptq_dequantizes_as_gptqmodel_does(llama, tmp_path, kind):
    """gptqmodel's own torch kernel, in its own venv, against mpconvert's reading of the same asymmetric file (v1:
    zeros stored as zero−1; v2: the zeros themselves)."""
    ref = _reference(fixture_python(), "gptqmodel", llama[kind], tmp_path)
    src = open_source("x", llama[kind], "llama")
    assert len(ref) == 14
    for name, w in ref.items():
        ours = dequantize(src.modules[name].scheme, src.modules[name].tensors, *w.shape)
        assert torch.equal(ours.to(w.dtype), w), name


def _reference(python, producer: str, path, tmp_path) -> dict:
    out = tmp_path / f"{producer}.safetensors"
    subprocess.run([str(python), "-P", str(HERE / "reference.py"), producer, str(path), str(out)], check=True,
                   capture_output=True, cwd=tmp_path)
    return load_file(out)


def test_autoawq_gemm_output_is_read_as_gptqmodels_awq_is(llama, cli, tmp_path):
    """The legacy producer (AutoAWQ 0.2.9, its own venv): the same GEMM layout as gptqmodel's AWQ (names, packing,
    shapes; AutoAWQ keeps fp16 scales), dequantized bit for bit as AutoAWQ's own dequantize_gemm does; a build from it
    verifies (numeric: its clipped weights still imply its own folded norm) and binds AWQ-Marlin."""
    auto, gm = (open_source("x", llama[k], "llama") for k in ("autoawq", "awq"))
    assert {n: {s: (t.dtype.replace("BF16", "F16"), t.shape) for s, t in v.tensors.items()}
            for n, v in auto.modules.items()} == {n: {s: (t.dtype.replace("BF16", "F16"), t.shape)
                                                       for s, t in v.tensors.items()} for n, v in gm.modules.items()}
    assert {v.scheme for v in auto.modules.values() if v.scheme.format == "awq"} == \
        {v.scheme for v in gm.modules.values() if v.scheme.format == "awq"}
    ref = _reference(autoawq_python(), "autoawq", llama["autoawq"], tmp_path)
    assert len(ref) == 14
    for name, w in ref.items():
        view = auto.modules[name]
        assert torch.equal(dequantize(view.scheme, view.tensors, *w.shape).to(w.dtype), w), name
    out = tmp_path / "out"
    build(cli, write_recipe(tmp_path, {**llama, "aa": llama["autoawq"]}, {"aa": "aa"}, "aa"), out)
    r = cli("verify", out, "--numeric", "--base", llama["base"], "--engine", "sglang")
    assert r.exit_code == 0, r.output
    [rank] = loaded(out)
    assert rank["methods"]["model.layers.0.self_attn.qkv_proj"] == ["AWQLinearMethod", "AWQMarlinLinearScheme"]


def test_v1_zero_points_are_read_word_wise_as_gptqmodel_writes_them():
    """gptqmodel writes v1 as the v2 word − 0x11111111 (a zero of 0 borrows from its neighbour) and reads it back by
    adding: only the word-wise reading recovers every zero, borrowing ones included."""
    zeros = torch.tensor([[0, 5, 0, 0, 15, 1, 0, 8], [3, 0, 7, 0, 0, 0, 0, 0]])
    v2 = pack_cols(zeros, 4)
    v1 = v2.to(torch.int64) - 0x11111111
    v1 = torch.where(v1 < -2**31, v1 + 2**32, v1).to(torch.int32)
    assert torch.equal(unpack_cols(v1_to_v2_words(v1, 4), 4), zeros)
    assert not torch.equal((unpack_cols(v1, 4) + 1) & 15, zeros)  # the nibble-wise reading loses the borrows
    assert (unpack_cols(v1_to_v2_words(v1.numpy(), 4), 4) == zeros.numpy()).all()  # numpy path (value checks)


def test_dense_mix_of_the_new_formats_builds_verifies_and_loads_natively(llama, cli, tmp_path):
    sources = {"w4": "ct-w4a16", "w4a": "ct-w4a16-asym", "w8": "ct-w8a16-channel", "gw": "ct-gptq-asym-weight",
               "ga": "gptq-asym", "gav2": "gptq-asym-v2", "int8": "ct-w8a8"}
    rules = """
    - {match: "mlp.*", layers: 0, source: w4a}
    - {match: "self_attn.*", layers: 0, source: ga}
    - {match: "self_attn.o_proj", layers: 1, source: gav2}
    - {match: "self_attn.*", layers: 1, source: w8}
    - {match: "mlp.down_proj", layers: 1, source: int8}
    - {match: "mlp.*", layers: 1, source: gw}
    """
    out = tmp_path / "out"
    manifest = build(cli, write_recipe(tmp_path, llama, sources, "w4", rules), out, "--tp", "2")
    check_faithful(out, manifest, llama, sources, "llama")
    qkv = manifest["modules"]["model.layers.0.self_attn.q_proj"]
    assert qkv["format"] == "wna16" and qkv["params"]["repacked_from"] == "gptq"
    assert manifest["modules"]["model.layers.1.self_attn.o_proj"]["params"]["repacked_from"] == "gptq_v2"
    assert {t["rewrite"] for t in qkv["tensors"].values()} == {"repack_gptq_to_wna16"}
    assert "g_idx" not in qkv["tensors"] and qkv["tensors"]["weight_packed"]["renamed_from"] == "qweight"
    r = cli("verify", out, "--numeric", "--base", llama["base"], "--engine", "sglang", "--tp", "2")
    assert r.exit_code == 0, r.output
    for rank in loaded(out, tp=2):
        m = rank["methods"]
        for unit in ("model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj",
                     "model.layers.1.self_attn.qkv_proj", "model.layers.1.self_attn.o_proj",
                     "model.layers.1.mlp.gate_up_proj"):
            assert m[unit] == ["CompressedTensorsLinearMethod", "CompressedTensorsWNA16"], unit
        assert m["model.layers.1.mlp.down_proj"][0] == "W8A8Int8LinearMethod"
    # byte-identical rebuild (the repack is deterministic)
    again = build(cli, write_recipe(tmp_path, llama, sources, "w4", rules), tmp_path / "again", "--tp", "2")
    assert again == manifest


def test_moe_pack_quantized_experts_load_on_their_native_method(moe, cli, tmp_path):
    sources = {"w4": "ct-w4a16", "int8": "ct-w8a8"}
    rules = """
    - {match: "self_attn.*", source: int8}
    - {match: "mlp.experts.*", layers: 1, source: int8}
    """
    out = tmp_path / "out"
    manifest = build(cli, write_recipe(tmp_path, moe, sources, "w4", rules), out, "--tp", "2")
    check_faithful(out, manifest, moe, sources, "qwen3_moe")
    assert manifest["units"]["model.layers.0.mlp.experts"]["format"] == "wna16"
    for rank in loaded(out, tp=2):
        assert rank["methods"]["model.layers.0.mlp.experts"] == ["CompressedTensorsFusedMoEMethod",
                                                                  "CompressedTensorsWNA16MoE"]
    r = cli("verify", out, "--numeric", "--base", moe["base"], "--engine", "sglang", "--tp", "2")
    assert r.exit_code == 0, r.output


def _edit_config(src, dst, **changes):
    d = copy(src, dst)
    cfg = json.loads((d / "config.json").read_text())
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    for key, value in changes.items():
        where, field = key.split("__")
        (cfg["quantization_config"] if where == "top" else group if where == "group" else group["weights"])[field] = \
            value
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes,match", [
    ({"weights__actorder": "group"}, "actorder 'group'"),
    ({"weights__num_bits": 3}, "3-bit integer weights have no SGLang Marlin kernel"),
    ({"weights__dynamic": True}, "dynamic weight quantization"),
    ({"group__format": "naive-quantized", "top__format": "naive-quantized"}, "format 'naive-quantized'"),
    ({"weights__strategy": "tensor"}, "strategy 'tensor'"),
    ({"top__sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity is not supported"),
    ({"top__transform_config": {"config_groups": {}}}, "transforms are not supported"),
])
def test_unsupported_compressed_tensors_variants_are_refused(llama, cli, tmp_path, changes, match):
    bad = _edit_config(llama["ct-w4a16"], tmp_path / "bad", **changes)
    recipe = write_recipe(tmp_path, {**llama, "bad": bad}, {"w4": "bad"}, "w4")
    text = fails(cli, tmp_path, recipe, match=match)
    assert "bad" in text  # names the source


def test_pack_quantized_experts_are_not_mixed_with_others_in_one_layer(moe, cli, tmp_path):
    """Per layer they serve (above); as one format group of a mixed-experts layer they are not offered yet."""
    text = fails(cli, tmp_path, write_recipe(tmp_path, moe, {"w4": "ct-w4a16", "int8": "ct-w8a8"}, "w4",
                                             '- {match: "mlp.experts.*", layers: 1, experts: "0-3", source: int8}'),
                 match="mixes formats across its experts")
    assert "compressed-tensors WNA16 MoE" in text and "model.layers.1.mlp.experts" in text


def test_asymmetric_experts_and_desc_act_asymmetric_gptq_are_refused_with_the_reason(llama, moe, cli, tmp_path):
    for kind in ("ct-w4a16-asym", "gptq-asym"):  # asymmetric GPTQ experts are repacked first, then refused alike
        text = fails(cli, tmp_path, write_recipe(tmp_path, moe, {"a": kind}, "a"),
                     match="asymmetric (zero-point) experts")
        assert "model.layers.0.mlp.experts" in text
    text = fails(cli, tmp_path, write_recipe(tmp_path, llama, {"ga": "gptq-asym-v2-desc"}, "ga"),
                 match="desc_act permutation")
    assert "model.layers.0." in text and "re-quantize with desc_act=False or sym=True" in text


def test_a_repack_that_would_change_a_weight_is_refused_before_anything_lands(llama, cli, tmp_path, monkeypatch):
    """The build-time proof: a repack whose output dequantizes differently stops the build; nothing is written."""
    gptq = FORMATS["gptq"]
    real = gptq.repack_tensors

    def off_by_one(t, p, out_f, in_f):
        made = real(t, p, out_f, in_f)
        made["weight_scale"] = made["weight_scale"] * 2
        return made

    monkeypatch.setattr(gptq, "repack_tensors", off_by_one)
    r = cli("build", write_recipe(tmp_path, llama, {"ga": "gptq-asym"}, "ga"), "-o", tmp_path / "out")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "error: source 'ga'" in r.output and "changed its weight" in " ".join(r.output.split())
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "mpconvert-tmp" in p.name]


def test_ignore_lists_match_as_sglang_matches_them():
    """A compressed-tensors `ignore` list decides which modules a source may hold quantized: mpconvert's matcher (one
    per list, prepared for 88k modules) says what SGLang's own check_equal_or_regex_match says — exact names, dotted
    suffixes (never prefixes), `re:` regexes from the start — over random names and lists."""
    import random

    from sglang.srt.layers.quantization.compressed_tensors.utils import check_equal_or_regex_match

    from mpconvert.formats.compressed_tensors import _matcher

    rnd = random.Random(7)
    parts = ["model", "layers", "0", "1", "12", "mlp", "experts", "3", "gate", "gate_proj", "self_attn", "q_proj",
             "lm_head", "shared_experts", "down_proj"]
    names = [".".join(rnd.choice(parts) for _ in range(rnd.randint(1, 6))) for _ in range(300)]
    names += ["lm_head", "model.layers.0.mlp.gate", "model.layers.0.mlp.experts.0.gate_proj"]
    regexes = ["re:.*mlp\\.gate$", "re:.*lm_head", "re:model\\.layers\\.1\\.", "re:(?:.*self_attn)", "re:q_proj",
               "re:.*experts\\.[0-3]\\..*", "re:"]
    for _ in range(400):
        ignore = [rnd.choice(names).split(".", rnd.randint(0, 3))[-1] if rnd.random() < 0.6 else rnd.choice(regexes)
                  for _ in range(rnd.randint(0, 4))]
        matches = _matcher(ignore)
        for name in rnd.sample(names, 40):
            assert matches(name) == check_equal_or_regex_match(name, ignore), (name, ignore)


def _same_size_shapes(shape: list[int]) -> list[tuple[int, ...]]:
    """The other shapes a tensor's elements could be written in: a scalar as [] or [1], a column as [n], [n, 1] or
    [1, n]."""
    n = 1
    for d in shape:
        n *= d
    return [s for s in ([(), (1,)] if n == 1 else [(n,), (n, 1), (1, n)]) if s != tuple(shape)]


@pytest.mark.parametrize("kind", ["ct-fp8-static", "native-fp8-tensor", "ct-fp8-dynamic", "ct-w8a8", "native-w8a8"])
def test_a_scale_in_another_shape_is_taken_only_where_sglang_loads_it(llama, cli, tmp_path, kind):
    """A scale's elements written in another shape of the same size ([] for [1], [out] or [1, out] for [out, 1]): build
    takes it only where SGLang's own loader does, and SGLang then holds exactly what it holds for the shape as the
    producer wrote it; every other is refused in one line naming the tensor and the shape it needs. (A flat [out]
    per-channel scale passed build and verify and crashed SGLang's loader — a shape assertion — at serve time; a
    scalar [] scale crashed build's value check.)"""
    src = copy(llama[kind], tmp_path / "src")
    shard = src / "model.safetensors"
    header, data = header_of(shard)
    recipe = write_recipe(tmp_path, {**llama, "q": src}, {"q": "q"}, "q")
    taken = {}
    for name in sorted(n for n in header if n.startswith("model.layers.0.") and n.endswith("scale")):
        for shape in _same_size_shapes(header[name]["shape"]):
            put_header(shard, {**header, name: {**header[name], "shape": list(shape)}}, data)
            r = cli("build", recipe, "-o", tmp_path / "o")
            if r.exit_code == 0:
                taken[name] = list(shape)
                shutil.rmtree(tmp_path / "o")
            else:
                assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
                assert f"{name} is " in r.output and " needs " in r.output, r.output
    put_header(shard, header, data)
    build(cli, recipe, tmp_path / "as-written")
    if header["model.layers.0.mlp.down_proj.weight_scale"]["shape"] != [1]:  # per-channel: [out, 1] and nothing else
        assert taken == {}
        return
    assert taken and set(map(tuple, taken.values())) == {()}  # per-tensor: a scalar scale as [] or [1]
    put_header(shard, {**header, **{n: {**header[n], "shape": s} for n, s in taken.items()}}, data)
    build(cli, recipe, tmp_path / "reshaped")
    [as_written], [reshaped] = loaded(tmp_path / "as-written"), loaded(tmp_path / "reshaped")
    assert reshaped["params"] == as_written["params"]  # every parameter: dtype, shape and a hash of its data
