"""Off the happy path, by class: malformed safetensors, wrong-typed configs, bad values in sources, odd recipes and
outputs, broken manifests. Each is one `error:` line naming the file/field and exit 2 (or, for verify, a finding and
exit 1) — never a traceback, never a partial output. Real files: the fixtures' shards rewritten byte by byte."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from helpers import build, build_once, copy, fails, refused, resign, set_scheme, write_recipe
from mpconvert.checkpoint import INDEX

L0 = "model.layers.0"


# ---- safetensors files written by hand ---------------------------------------------------------------------------
def read_raw(f: Path) -> tuple[dict, bytes]:
    b = f.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def write_raw(f: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(src: Path, edit) -> Path:
    """Rewrite the only shard's header: edit(header dict, data) → (header text, data)."""
    [f] = src.glob("*.safetensors")
    header, data = read_raw(f)
    text, data = edit(header, data)
    write_raw(f, text, data)
    return src


def dumps(h: dict) -> str:
    return json.dumps(h, separators=(",", ":"))


def overlap(h, data):  # k_proj's bytes alias q_proj's: the official library refuses this
    q, k = h[f"{L0}.self_attn.q_proj.weight"], h[f"{L0}.self_attn.k_proj.weight"]
    k["data_offsets"] = list(q["data_offsets"])
    return dumps(h), data


def gap(h, data):  # one tensor's bytes moved 8 bytes on: a hole before it
    last = max((v for k, v in h.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])
    b, e = last["data_offsets"]
    last["data_offsets"] = [b + 8, e + 8]
    return dumps(h), data[:b] + b"\0" * 8 + data[b:]


def negative_begin(h, data):
    t = h[f"{L0}.self_attn.q_proj.weight"]
    t["data_offsets"] = [-8, t["data_offsets"][1] - t["data_offsets"][0] - 8]
    return dumps(h), data


def duplicate_key(h, data):
    name = f"{L0}.self_attn.q_proj.weight"
    text = dumps(h)
    return text[:-1] + "," + json.dumps(name) + ":" + json.dumps(h[name]) + "}", data


def duplicate_field(h, data):  # a second dtype inside one entry: the later would silently win in a plain parse
    name = f"{L0}.input_layernorm.weight"
    text = dumps(h)
    entry = json.dumps(h[name], separators=(",", ":"))
    return text.replace(entry, entry[:-1] + ',"dtype":"F32"}', 1), data


def shape(value):
    def edit(h, data):
        h[f"{L0}.input_layernorm.weight"]["shape"] = value
        return dumps(h), data
    return edit


def offsets(value):
    def edit(h, data):
        h[f"{L0}.input_layernorm.weight"]["data_offsets"] = value
        return dumps(h), data
    return edit


def newline_name(h, data):
    name = f"{L0}.input_layernorm.weight"
    h[name + "\n"] = h.pop(name)
    return dumps(h), data


def appended(h, data):
    return dumps(h), data + b"\0" * 64


def bad_metadata(h, data):
    h["__metadata__"] = {"format": 1}
    return dumps(h), data


HEADER_CASES = {
    "overlapping offsets": (overlap, "share bytes (overlapping data_offsets)"),
    "gap between tensors": (gap, "belong to no tensor"),
    "negative begin": (negative_begin, "data_offsets"),
    "duplicate key": (duplicate_key, "twice"),
    "duplicate field in an entry": (duplicate_field, "lists 'dtype' twice"),
    "negative shape": (shape([-1, -256]), "non-negative integers"),
    "boolean shape": (shape([True, 256]), "non-negative integers"),
    "float offsets": (offsets([0.0, 512.0]), "must be two integers"),
    "string offsets": (offsets(["0", "512"]), "must be two integers"),
    "newline in a name": (newline_name, "characters outside"),
    "appended bytes": (appended, "after the last tensor"),
    "metadata not strings": (bad_metadata, "__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_safetensors_source_is_refused(case, llama, cli, tmp_path):
    edit, match = HEADER_CASES[case]
    src = edit_header(copy(llama["ct-fp8-static"], tmp_path / "src"), edit)
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    fails(cli, tmp_path, r, match=match)


def test_overlap_in_the_base_is_refused_too(llama, cli, tmp_path):
    base = edit_header(copy(llama["base"], tmp_path / "b"), overlap)
    r = write_recipe(tmp_path, {**llama, "base": base}, {"g": "gptq"}, "g")
    fails(cli, tmp_path, r, match="share bytes (overlapping data_offsets)")


# ---- values in sources -----------------------------------------------------------------------------------------
def set_values(src: Path, name: str, values) -> Path:
    """Overwrite tensor `name` of the source in place (bytes only: header, size and layout unchanged)."""
    [f] = src.glob("*.safetensors")
    header, data = read_raw(f)
    t = header[name]
    b, e = t["data_offsets"]
    dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32}[t["dtype"]]
    arr = np.frombuffer(data[b:e], dt).copy()
    if t["dtype"] == "BF16":
        f32 = np.frombuffer(arr.astype(np.uint32) << 16, np.float32).copy()
        f32[: len(values)] = values
        arr = (f32.view(np.uint32) >> 16).astype(np.uint16)
    else:
        arr[: len(values)] = values
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    with open(f, "r+b") as fh:
        fh.seek(8 + n + b)
        fh.write(arr.tobytes())
    return src


VALUE_CASES = {
    "NaN FP8 weight scale": ("ct-fp8-static", f"{L0}.mlp.down_proj.weight_scale", [np.nan],
                             "weight_scale has NaN or infinite scales"),
    "zero FP8 input scale": ("ct-fp8-static", f"{L0}.mlp.down_proj.input_scale", [0.0],
                             "input_scale has zero or negative scales"),
    "negative Int8 scale": ("ct-w8a8", f"{L0}.mlp.down_proj.weight_scale", [-1.0], "zero or negative scales"),
    "negative GPTQ scale": ("gptq", f"{L0}.mlp.down_proj.scales", [-0.5], "scales has zero or negative scales"),
    "infinite GPTQ scale": ("gptq", f"{L0}.mlp.down_proj.scales", [np.inf], "NaN or infinite scales"),
    "g_idx out of range": ("gptq", f"{L0}.mlp.down_proj.g_idx", [99], "g_idx has values outside"),
    "zero AWQ scale": ("awq", f"{L0}.self_attn.q_proj.scales", [0.0], "zero or negative scales"),
    "NaN norm of a folded-scale source": ("awq", f"{L0}.input_layernorm.weight", [np.nan],
                                          "input_layernorm.weight has NaN or infinite values"),
}


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_bad_values_are_refused_before_writing(case, llama, cli, tmp_path):
    kind, name, values, match = VALUE_CASES[case]
    src = set_values(copy(llama[kind], tmp_path / "src"), name, values)
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    fails(cli, tmp_path, r, match=match)
    assert not (tmp_path / "out").exists()


def test_a_bad_value_is_refused_first_whatever_else_is_wrong(llama, cli, tmp_path):
    """Build checks the values in a child process while it plans the rest: a problem there is still the one refused
    when the plan also fails later (--tp 3 cannot split 4 heads), as when the checks ran in turn."""
    r = write_recipe(tmp_path, llama, {"s": "gptq"}, "s")
    fails(cli, tmp_path, r, "--tp", "3", match="num_attention_heads=4 is not divisible by 3")  # what --tp 3 alone is refused for
    src = set_values(copy(llama["gptq"], tmp_path / "src"), f"{L0}.mlp.down_proj.scales", [-0.5])
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    fails(cli, tmp_path, r, "--tp", "3", match="scales has zero or negative scales")


ROW = [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("counts,match", [
    ('{"0": [NaN, 1, 1, 1, 1, 1, 1, 1], "1": [1, 1, 1, 1, 1, 1, 1, 1]}', "negative, NaN or infinite counts"),
    # a file recorded on another model: fewer or more experts, layers it does not have (each was accepted, or
    # caught only when a top pick happened to fall past the model's experts)
    (json.dumps({"0": ROW[:4], "1": ROW[4:]}), "counts 4 experts in layer 0, but the model has 8"),
    (json.dumps({"0": [100] + [0] * 11, "1": [0] * 12}), "counts 12 experts in layer 0, but the model has 8"),
    (json.dumps({"0": ROW, "1": ROW, "7": ROW}), "has counts for layer 7, but the model has layers 0-1"),
    (json.dumps({"-1": ROW, "0": ROW, "1": ROW}), "has counts for layer -1"),
    (json.dumps({"0": [True] + ROW[1:], "1": ROW}), "every layer's counts must be a list of numbers"),
    # a layer given twice: json keeps the last, and "0" and "00" are one layer
    ('{"0": %s, "1": %s, "0": %s}' % (ROW, ROW, ROW[::-1]), "gives layer 0 twice; give each layer's counts once"),
    (json.dumps({"0": ROW, "1": ROW, "01": ROW}), "gives layer 1 (as '1' and '01') twice"),
])
def test_routing_counts_that_do_not_fit_the_model(counts, match, moe, cli, tmp_path):
    (tmp_path / "routing.json").write_text(counts)
    r = write_recipe(tmp_path, moe, {"fp8": "ct-fp8-block", "int8": "ct-w8a8"}, "int8",
                     '- {match: "mlp.experts.*", experts: {file: routing.json, top: 2}, source: fp8}')
    fails(cli, tmp_path, r, match=match)


# ---- configs of the wrong type -----------------------------------------------------------------------------------
def edit_config(src: Path, edit, name: str = "config.json") -> Path:
    p = src / name
    cfg = json.loads(p.read_text())
    edit(cfg)
    p.write_text(json.dumps(cfg))
    return src


def qc(**fields):
    return lambda c: c["quantization_config"].update(fields)


CONFIG_CASES = {
    "bits a string": ("gptq", qc(bits="abc"), "quantization_config.bits"),
    "group_size null": ("gptq", qc(group_size=None), "quantization_config.group_size"),
    "group_size zero": ("gptq", qc(group_size=0), "group_size 0 must be -1 (one group) or positive"),
    "config_groups a list": ("ct-w8a8", qc(config_groups=[]), "quantization_config.config_groups"),
    "bad regex in ignore": ("ct-w8a8", qc(ignore=["re:(("]), "bad regex"),
    "quant_method a number": ("gptq", qc(quant_method=7), "quant_method must be a string"),
    "quantization_config a list": ("gptq", lambda c: c.update(quantization_config=[1]), "must be a JSON object"),
    "weight_block_size zero": ("native-fp8-block", qc(weight_block_size=[0, 128]), "must be two positive integers"),
    "fp8 activation scheme": ("native-fp8-block", qc(activation_scheme="weekly"), "activation_scheme"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_wrong_typed_producer_config(case, llama, cli, tmp_path):
    kind, edit, match = CONFIG_CASES[case]
    src = edit_config(copy(llama[kind], tmp_path / "src"), edit)
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    fails(cli, tmp_path, r, match=match)


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", "abc", "num_hidden_layers='abc' must be an integer"),
    ("num_attention_heads", 0, "num_attention_heads=0 must be an integer ≥ 1"),
    ("num_key_value_heads", True, "num_key_value_heads=True must be an integer"),
    ("model_type", None, "model_type=None must be a non-empty string"),
    ("architectures", "LlamaForCausalLM", "architectures='LlamaForCausalLM' must be a list of model class names"),
    ("architectures", None, "architectures=None must be a list of model class names"),
    ("architectures", [""], "architectures=[''] must be a list of model class names"),
    # sizes every source is compared with: refused in the base, not blamed on the first source that has the number
    ("hidden_size", "256", "hidden_size='256' must be an integer ≥ 1"),
    ("intermediate_size", 512.0, "intermediate_size=512.0 must be an integer ≥ 1"),
    ("vocab_size", 0, "vocab_size=0 must be an integer ≥ 1"),
    ("head_dim", True, "head_dim=True must be an integer"),
    ("tie_word_embeddings", "false", "tie_word_embeddings='false' must be true or false"),
    ("mlp_only_layers", ["0"], "mlp_only_layers=['0'] must be a list of layer numbers"),
])
def test_wrong_typed_model_config(field, value, match, llama, cli, tmp_path):
    base = edit_config(copy(llama["base"], tmp_path / "b"), lambda c: c.update({field: value}))
    r = write_recipe(tmp_path, {**llama, "base": base}, {"g": "gptq"}, "g")
    fails(cli, tmp_path, r, "--tp", "2", match=match)


def test_a_source_of_another_architecture_is_refused(llama, cli, tmp_path):
    # SGLang picks the model class from the base's `architectures`; a source that names another class was made from
    # another model. A source that omits the key (older producers) is fine.
    src = edit_config(copy(llama["gptq"], tmp_path / "src"), lambda c: c.update(architectures=["MixtralForCausalLM"]))
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    fails(cli, tmp_path, r,
          match="architectures=['MixtralForCausalLM'] but the base has architectures=['LlamaForCausalLM']")
    edit_config(src, lambda c: c.pop("architectures"))
    assert cli("build", str(r), "-o", str(tmp_path / "out")).exit_code == 0


@pytest.mark.parametrize("base_ties", [True, False])
def test_a_source_that_leaves_out_a_default_key(base_ties, llama, cli, tmp_path):
    """transformers saves a config without the keys equal to PretrainedConfig's defaults: AutoAWQ's (transformers
    4.51) has no tie_word_embeddings for a model that ties them (Gemma 2; real, refused as `None but the base has
    True`). Absent means true: a base that ties accepts it, a base that does not still refuses it."""
    from safetensors.torch import load_file, save_file

    base = edit_config(copy(llama["base"], tmp_path / "base"), lambda c: c.update(tie_word_embeddings=base_ties))
    src = edit_config(copy(llama["ct-w8a8"], tmp_path / "src"), lambda c: c.pop("tie_word_embeddings"))
    for d in (base, src) if base_ties else ():  # a model that ties holds no lm_head of its own
        shard = next(d.glob("*.safetensors"))
        save_file({k: v for k, v in load_file(shard).items() if k != "lm_head.weight"}, shard, metadata={"format": "pt"})
    r = write_recipe(tmp_path, {**llama, "base": base, "s": src}, {"s": "s"}, "s")
    if base_ties:
        b = cli("build", str(r), "-o", str(tmp_path / "out"))
        assert b.exit_code == 0, b.output
    else:
        fails(cli, tmp_path, r, match="tie_word_embeddings=True but the base has tie_word_embeddings=False")


@pytest.mark.parametrize("model,edit,match", [
    # SGLang builds the model from config.json: fewer layers than the weights hold are served silently wrong, a
    # width or head count the weights lack fails at load; each was built and verified as it was
    ("llama", {"num_hidden_layers": 1}, "num_hidden_layers=1, but the weights hold layers 0-1"),
    ("llama", {"num_hidden_layers": 3}, "num_hidden_layers=3, but the weights hold layers 0-1"),
    # counted, not spelled out: a set of 10^9 layer ids once took all of memory (killed, no message)
    ("llama", {"num_hidden_layers": 10**9}, "num_hidden_layers=1000000000, but the weights hold layers 0-1"),
    ("moe", {"num_experts": 10**12}, "mlp.gate.weight has shape [8, 256], but config.json implies [1000000000000, "
                                     "256]"),
    ("llama", {"num_attention_heads": 8}, "o_proj.weight has shape [256, 256], but config.json implies [256, 512]"),
    ("llama", {"num_key_value_heads": 1}, "k_proj.weight has shape [256, 256], but config.json implies [64, 256]"),
    ("llama", {"vocab_size": 2048}, "has shape [1024, 256], but config.json implies [2048, 256]"),
    ("llama", {"intermediate_size": 1024}, "proj.weight has shape"),
    ("moe", {"moe_intermediate_size": 128}, "experts.0.down_proj.weight has shape [256, 256], but config.json implies "
                                            "[256, 128]"),
    ("moe", {"num_local_experts": 16}, "mlp.gate.weight has shape [8, 256], but config.json implies [16, 256]"),
    ("deepseek", {"kv_lora_rank": 64}, "kv_a_proj_with_mqa.weight has shape [192, 256], but config.json implies "
                                       "[128, 256]"),
    ("deepseek", {"qk_nope_head_dim": 32}, "but config.json implies"),
])
def test_a_config_that_disagrees_with_its_weights(model, edit, match, llama, moe, deepseek, cli, tmp_path):
    """The same edit in the base and every source (so that they agree with each other): refused, naming a tensor."""
    fixtures = {"llama": llama, "moe": moe, "deepseek": deepseek}[model]
    sources = {"llama": {"g": "gptq"}, "moe": {"g": "gptq"}, "deepseek": {"g": "gptq"}}[model]
    edited = {k: edit_config(copy(fixtures[k], tmp_path / k), lambda c: c.update(edit)) for k in ("base", "gptq")}
    r = write_recipe(tmp_path, {**fixtures, **edited}, sources, "g")
    fails(cli, tmp_path, r, match=match)


def test_a_moe_layer_missing_an_expert(moe, cli, tmp_path):
    """A base whose layer 1 lacks expert 7 (its tensors gone, the file otherwise valid): SGLang would serve that
    expert's uninitialised weights."""
    from safetensors.torch import load_file, save_file

    base = copy(moe["base"], tmp_path / "base")
    [f] = base.glob("*.safetensors")
    save_file({k: v for k, v in load_file(f).items() if ".layers.1.mlp.experts.7." not in k}, f, {"format": "pt"})
    r = write_recipe(tmp_path, {**moe, "base": base}, {"g": "gptq"}, "g")
    fails(cli, tmp_path, r, match="layer 1 holds experts 0-6, but config.json says 8 routed experts (ids 0-7)")


@pytest.mark.parametrize("model,gone,match", [
    # one tensor or a shard's worth gone from a layer: SGLang's loader leaves what it is not given uninitialized
    ("llama", ("model.layers.1.self_attn.o_proj.",), "layer 1 lacks self_attn.o_proj, which layers of its kind hold"),
    ("llama", ("model.layers.0.mlp.", "model.layers.0.post_attention_layernorm."),
     "layer 0 lacks mlp.down_proj (and 3 more), which layers of its kind hold (a shard or tensor missing?)"),
    ("moe", ("model.layers.0.mlp.experts.3.down_proj.",), "expert 3 of layer 0 lacks its down_proj (w2), which the "
                                                         "layer's other experts hold"),
    ("moe", ("model.layers.1.mlp.gate.",), "layer 1 lacks mlp.gate, which layers of its kind hold"),
    ("deepseek", ("model.layers.1.self_attn.kv_a_layernorm.",), "layer 1 lacks self_attn.kv_a_layernorm"),
])
def test_a_layer_missing_what_the_others_hold(model, gone, match, llama, moe, deepseek, cli, tmp_path):
    """A base with some of a layer's tensors gone, the files otherwise valid, and the recipe taking everything from
    the base: refused, naming the layer and the module (it built, and verified)."""
    from safetensors.torch import load_file, save_file

    fixtures = {"llama": llama, "moe": moe, "deepseek": deepseek}[model]
    base = copy(fixtures["base"], tmp_path / "base")
    [f] = base.glob("*.safetensors")
    save_file({k: v for k, v in load_file(f).items() if not k.startswith(gone)}, f, {"format": "pt"})
    fails(cli, tmp_path, write_recipe(tmp_path, {**fixtures, "base": base}, {"g": "gptq"}, "base"), match=match)


def test_a_shard_missing_without_an_index(llama, cli, tmp_path):
    """save_pretrained's numbered shards with no index to list them: a gap in the numbers is a missing shard (here
    the one holding layer 1 and the final norm — which would otherwise surface as a model without them)."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    base.mkdir()
    for f in fixtures_side_files(llama["base"]):
        shutil.copy(f, base / f.name)
    tensors = load_file(llama["base"] / "model.safetensors")
    second = ("model.layers.1.", "model.norm.")
    parts = [{k: v for k, v in tensors.items() if k != "lm_head.weight" and not k.startswith(second)},
             {k: v for k, v in tensors.items() if k.startswith(second)}, {"lm_head.weight": tensors["lm_head.weight"]}]
    assert sum(map(len, parts)) == len(tensors)
    for i, part in enumerate(parts, 1):
        save_file(part, base / f"model-{i:05d}-of-00003.safetensors", {"format": "pt"})
    recipe = write_recipe(tmp_path, {**llama, "base": base}, {"g": "gptq"}, "base")
    build(cli, recipe, tmp_path / "whole")  # (the three shards make the model)
    (base / "model-00002-of-00003.safetensors").unlink()
    fails(cli, tmp_path, recipe, match="shard model-00002-of-00003.safetensors is missing (no "
                                       "model.safetensors.index.json lists the shards, and they are numbered of 3)")


def fixtures_side_files(d: Path) -> list[Path]:
    return [f for f in d.iterdir() if f.is_file() and not f.name.endswith(".safetensors")]


def test_index_of_the_wrong_type(llama, cli, tmp_path):
    src = copy(llama["gptq"], tmp_path / "src")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    fails(cli, tmp_path, r, match="weight_map must map tensor names to shard file names")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": 3}}))
    fails(cli, tmp_path, r, match="weight_map must map tensor names to shard file names")


# ---- recipes and options ---------------------------------------------------------------------------------------
def test_recipe_that_is_a_directory_or_not_utf8(llama, cli, tmp_path):
    fails(cli, tmp_path, tmp_path, match="is a directory; pass the path of a recipe YAML file")
    p = tmp_path / "r.yaml"
    p.write_bytes(b"base: \xff\xfe\n")
    fails(cli, tmp_path, p, match="not UTF-8 text")


@pytest.mark.parametrize("rule,match", [
    # YAML's types as written: pydantic's lax mode took `experts: true` for expert 1 and `moe: "no"` for false
    ('layers: true', 'rules.0.layers: true is not allowed here; give text, an integer or a list of those'),
    ('experts: true', 'rules.0.experts: true is not allowed here; give text, an integer, a list of those or a mapping'),
    ('moe: "no"', 'rules.0.moe: "no" is not allowed here; give true or false'),
    ('moe: 1', 'rules.0.moe: 1 is not allowed here; give true or false'),
    ('layers: 1.0', 'rules.0.layers: 1.0 is not allowed here'),
    ('experts: {file: r.json, top: true}', 'rules.0.experts: top: Input should be a valid integer'),
    # an empty list named no experts: planning took it for a filter and failed on it (an internal error)
    ('experts: []', 'rules.0.experts: names no ids; name some (3, 0-5, "0-3,7") or remove the key'),
    ('layers: []', 'rules.0.layers: names no ids'),
])
def test_recipe_values_of_the_wrong_type(rule, match, llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g", f'- {{match: "mlp.*", source: g, {rule}}}')
    fails(cli, tmp_path, r, match=match)


@pytest.mark.parametrize("value", ["", " ~", " null"])
def test_recipe_value_left_empty(value, llama, cli, tmp_path):
    """Nothing, as YAML spells it (`default:` left empty, `~`): it said "default: null is not allowed here"."""
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g")
    r.write_text(r.read_text().replace("default: g", "default:" + value))
    fails(cli, tmp_path, r, match="default: an empty value (YAML reads `key:`, `~` and `null` alike) is not allowed "
                                  "here; give text")


@pytest.mark.parametrize("name", ["''", "' g'", '"a\\tb"'])
def test_a_source_name_must_be_plain_text(name, llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g")
    r.write_text(r.read_text().replace("\n  g:", f"\n  {name}:", 1))
    fails(cli, tmp_path, r, match="must be non-empty printable text without surrounding spaces")


def test_a_bad_shard_size_names_where_it_came_from(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g")
    r.write_text(r.read_text() + "output: {shard_size: 5 GiBs}\n")
    fails(cli, tmp_path, r, match=f"{r}: output.shard_size: bad size '5 GiBs'")
    fails(cli, tmp_path, r, "--shard-size", "0", match="--shard-size: bad size '0': must be positive")


def test_huge_layer_range_is_refused_without_allocating(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g", '- {match: "*", layers: "0-2000000000", source: g}')
    fails(cli, tmp_path, r, match="ids go up to 65535")


def test_absurd_shard_size(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g")
    fails(cli, tmp_path, r, "--shard-size", "9" * 400, match="bad size")
    fails(cli, tmp_path, r, "--shard-size", "9" * 25, match="larger than 1 PiB")


def test_a_failed_build_leaves_no_parent_directories(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g", '- {match: "*.cross_attn.*", source: base}')
    fails(cli, tmp_path, r, "-o", tmp_path / "new" / "deeper" / "out", match="selects nothing")
    assert not (tmp_path / "new").exists()


def test_output_under_a_file_or_a_read_only_filesystem(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "out", tmp_path / "file" / "deeper" / "out"):
        fails(cli, tmp_path, r, "-o", out, match=f"cannot create the output's parent directory ({tmp_path / 'file'} is "
              f"a file, not a directory)")
    fails(cli, tmp_path, r, "-o", "/proc/mpconvert-out", match="cannot write there")


def test_output_with_a_long_name_builds(llama, cli, tmp_path):
    """A name of 240 bytes is legal; the build's own side files beside it must not push past the 255-byte limit."""
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g")
    out = tmp_path / ("o" * 240)
    res = cli("build", r, "-o", out)
    assert res.exit_code == 0, res.output
    assert (out / "mpconvert_manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["recipe.yaml", out.name])


# ---- the Hugging Face cache layout --------------------------------------------------------------------------------
def hf_cache(src: Path, root: Path) -> Path:
    """src laid out as the Hugging Face cache holds a download: snapshots/<rev>/FILE -> ../../blobs/<sha>."""
    import hashlib

    repo = root / "models--org--model"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / sha)
        (snap / f.name).symlink_to(Path("../../blobs") / sha)
    return snap


def test_hugging_face_cache_snapshots_build(llama, cli, tmp_path):
    base = hf_cache(llama["base"], tmp_path / "hf-base")
    gptq = hf_cache(llama["gptq"], tmp_path / "hf-gptq")
    r = write_recipe(tmp_path, {**llama, "base": base, "g": gptq}, {"g": "g"}, "g")
    res = cli("build", r, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert cli("verify", tmp_path / "out").exit_code == 0


def test_a_link_leaving_the_cache_repository_is_refused(llama, cli, tmp_path):
    gptq = hf_cache(llama["gptq"], tmp_path / "hf")
    [shard] = gptq.glob("*.safetensors")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shard.resolve(), outside)
    shard.unlink()
    shard.symlink_to(outside)
    r = write_recipe(tmp_path, {**llama, "g": gptq}, {"g": "g"}, "g")
    fails(cli, tmp_path, r, match="outside the checkpoint directory (and outside a Hugging Face cache repository's")


@pytest.mark.parametrize("case", ["a FIFO", "a directory", "a link out", "a broken link"])
@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.safetensors"])
def test_a_model_file_that_is_not_a_regular_file_inside_the_directory(case, name, llama, cli, tmp_path):
    """A FIFO hung the build forever (config.json, a shard); a tokenizer that was a FIFO, a directory or a link to a
    device was silently left out of the output (which SGLang then could not serve), a link to /etc/passwd copied in.
    Each is now one line, before anything is written."""
    base = copy(llama["base"], tmp_path / "b")
    p = base / name
    p.rename(tmp_path / "moved")
    if case == "a FIFO":
        os.mkfifo(p)
    elif case == "a directory":
        p.mkdir()
    else:
        p.symlink_to(tmp_path / "moved" if case == "a link out" else base / "nothere")
    r = write_recipe(tmp_path, {**llama, "base": base}, {"g": "gptq"}, "g")
    match = {"a FIFO": "is a FIFO, not a regular file", "a directory": "is a directory",
             "a link out": "outside the checkpoint directory", "a broken link": ""}[case]
    text = fails(cli, tmp_path, r, match=match)
    assert name in text


# ---- verify on broken manifests and bad options -------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(llama, module_dir) -> Path:
    return build_once(module_dir, llama, {"fp8": "ct-fp8-static", "gptq": "gptq"}, "gptq",
                      '- {match: "self_attn.*", layers: 0, source: fp8}', "trust")


MANIFEST_EDITS = {
    "no model block": (lambda m: m.pop("model"), "breaks the manifest schema at model: required field is missing"),
    "no totals": (lambda m: m.pop("totals"), "totals: required field is missing"),
    "a module without tensors": (lambda m: m["modules"][f"{L0}.mlp.down_proj"].pop("tensors"),
                                 f"modules.{L0}.mlp.down_proj.tensors: required field is missing"),
    "an unknown format": (lambda m: set_scheme(m, f"{L0}.mlp.down_proj", "int3"), "unknown format 'int3'"),
    "GPTQ made asymmetric": (lambda m: set_scheme(m, f"{L0}.mlp.down_proj", sym=False), "params of gptq: sym"),
    "a scheme id past the table": (lambda m: m["modules"][f"{L0}.mlp.down_proj"].update(scheme_id=99),
                                   f"modules.{L0}.mlp.down_proj.scheme_id 99: the manifest has"),
    "a tensor row shared by two modules": (
        lambda m: m["modules"][f"{L0}.mlp.up_proj"]["tensors"].update(m["modules"][f"{L0}.mlp.down_proj"]["tensors"]),
        "is model.layers.0.mlp."),
    "a tensor row no module owns": (lambda m: [m["tensors"][c].append(m["tensors"][c][0]) for c in (
        "dtype", "shape", "sha256", "shard")] and m["tensors"]["name"].append("model.extra.weight"),
        "(model.extra.weight) belongs to no module"),
    "tensor columns of different lengths": (lambda m: m["tensors"]["sha256"].pop(), "column sha256 has"),
    "a shard index past the list": (lambda m: m["tensors"]["shard"].__setitem__(0, 7), "an index past the"),
    "a row past the table": (lambda m: m["modules"][f"{L0}.mlp.down_proj"]["tensors"].update(qweight=10**6),
                             "row 1000000 is past the table"),
    # past an int64: an OverflowError inside the row check once made it an internal error (exit 70)
    "a row past 2^63": (lambda m: m["modules"][f"{L0}.mlp.down_proj"]["tensors"].update(qweight=2**63),
                        "Expected int <= 9223372036854775807"),
    "a layer id past 2^63": (lambda m: m["modules"][f"{L0}.mlp.down_proj"].update(layer=2**64),
                             "Expected int <= 9223372036854775807"),
    # inspect prints the totals as recorded: a format with 0 weights was a ZeroDivisionError there (exit 70)
    "a format's totals with no weights": (lambda m: m["totals"]["by_format"]["gptq"].update(weights=0),
                                         "totals.by_format.gptq.weights: Expected int >= 1"),
    "totals that disagree with themselves": (
        lambda m: m["totals"].update(linear_bytes=m["totals"]["linear_bytes"] + 1), "are not the sums over by_format"),
    "a module with format and params inline (version 2)": (
        lambda m: m["modules"][f"{L0}.mlp.down_proj"].update(format="gptq"), "down_proj.format: unknown field"),
    "not JSON": (None, "not valid JSON"),
    # every error inside a map names its key (the decoder's own message says only `modules[...]`)
    "a layer that is a JSON true": (lambda m: m["modules"][f"{L0}.mlp.down_proj"].update(layer=True),
                                    f"modules.{L0}.mlp.down_proj.layer: Expected int | null, got bool"),
    "a negative dimension in the table": (lambda m: m["tensors"]["shape"].__setitem__(3, [4, -1]),
                                          "tensors.shape.3.1: Expected int >= 0"),
    "a unit without members": (lambda m: m["units"][f"{L0}.mlp.down_proj"].update(members=[]),
                               f"units.{L0}.mlp.down_proj.members: Expected array of length >= 1"),
    "a source fingerprint that is no sha256": (lambda m: m["sources"]["gptq"].update(fingerprint="x"),
                                               "sources.gptq.fingerprint: Expected str matching regex"),
    "a row key that is no row number": (lambda m: m["tensors"]["rewrite"].update({"5x": "a"}),
                                        "tensors.rewrite.5x: Expected str matching regex"),
    "a float for a count in the totals": (lambda m: m["totals"]["by_format"]["fp8"].update(modules=1.0),
                                          "totals.by_format.fp8.modules: Expected int, got float"),
    "an old version": (lambda m: m.update(manifest_version=1), "manifest_version 1 is not 3"),
    "a newer version": (lambda m: m.update(manifest_version=4, mpconvert_version="9.0"),
                        "manifest_version 4 is newer than this mpconvert reads (3; written by mpconvert 9.0); upgrade"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_verify_reports_a_broken_manifest_as_a_finding(case, built, cli, tmp_path):
    edit, match = MANIFEST_EDITS[case]
    d = copy(built, tmp_path / "d")
    if edit is None:
        (d / "mpconvert_manifest.json").write_text("{not json")
    else:
        m = json.loads((d / "mpconvert_manifest.json").read_text())
        edit(m)
        resign(d, m)
    r = cli("verify", d, "--json")
    assert r.exit_code == 1, r.output
    rep = json.loads(r.stdout)
    assert any(f["check"] == "manifest" and match in f["message"] for f in rep["findings"]), rep["findings"]
    r = cli("inspect", d)  # every other reader: one error line, exit 2
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output


INDEX_EDITS = {  # each: what happens to the index, and what the one finding says
    "gone": (None, "model.safetensors.index.json", "missing (build writes it"),
    "not JSON": (lambda d: "{", "model.safetensors.index.json", "cannot parse safetensors index"),
    "a weight_map that is a list": (lambda d: {**d, "weight_map": list(d["weight_map"])},
                                    "model.safetensors.index.json", "weight_map must map tensor names"),
    "a tensor left out": (lambda d: {**d, "weight_map": dict(list(d["weight_map"].items())[1:])},
                          "lm_head.weight", "not in the index (model.safetensors.index.json), the manifest places"),
    "config.json gone": (None, "config.json", "missing (build writes it: SGLang reads the model"),
}


@pytest.mark.parametrize("case", sorted(INDEX_EDITS))
def test_an_index_that_fails_is_one_finding_with_its_fix(case, built, cli, tmp_path):
    """The index unreadable or short of a tensor, or config.json gone: one finding, naming the file (or the tensor)
    and the fix — not one more per tensor the index would have placed, nor a message written for sources ("point the
    recipe at …")."""
    edit, where, match = INDEX_EDITS[case]
    d = copy(built, tmp_path / "d")
    p = d / ("config.json" if where == "config.json" else "model.safetensors.index.json")
    if edit is None:
        p.unlink()
    else:
        new = edit(json.loads(p.read_text()))
        p.write_text(new if isinstance(new, str) else json.dumps(new))
    r = cli("verify", d, "--json")
    assert r.exit_code == 1, r.output
    (f,) = json.loads(r.stdout)["findings"]
    check = "config" if where == "config.json" else "structure"
    assert (f["check"], f["where"]) == (check, where) and match in f["message"], f
    assert "restore" in f["message"] or "fix or re-save" in f["message"], f


@pytest.mark.parametrize("where", ["the whole file", "a value of the recipe", "a count"])
def test_a_manifest_nested_past_any_reader_is_a_finding(where, built, cli, tmp_path):
    """JSON nested 100,000 deep — the whole manifest, inside a free-form value, in place of a count — made the
    manifest's decoder (or the reader that names the broken field) raise RecursionError: an internal error (exit 70)
    for verify and inspect. Now a manifest finding, and inspect's one line."""
    d = copy(built, tmp_path / "d")
    p = d / "mpconvert_manifest.json"
    deep = "[" * 100_000 + "]" * 100_000
    raw = p.read_text()
    p.write_text({"the whole file": deep,
                  "a value of the recipe": raw.replace('"recipe":{', '"recipe":{"x":' + deep + ",", 1),
                  "a count": raw.replace('"built_for_tp":1', '"built_for_tp":' + deep, 1)}[where])
    assert p.read_text() != raw
    r = cli("verify", d, "--json")
    assert r.exit_code == 1, r.output
    assert any(f["check"] == "manifest" and "nested deeper than its readers follow" in f["message"]
               for f in json.loads(r.stdout)["findings"])
    r = cli("inspect", d)
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.splitlines()) == 1, r.output


def test_a_manifest_reads_back_to_its_own_bytes(built):
    """The typed manifest written again is, byte for byte, the file build wrote (nothing lost or added by reading:
    the empty maps and the layout as written, absent fields left absent)."""
    from mpconvert.manifest import MANIFEST, parse_manifest

    raw = (built / MANIFEST).read_bytes()
    assert parse_manifest(raw, "m").dumps() == raw


def _json_edit(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


OUTPUT_JSON_EDITS = {  # (file, edit, where the finding points)
    "a bool for an int in config.json": ("config.json", lambda c: c.update(pretraining_tp=True),
                                         "config.json pretraining_tp"),  # pretraining_tp: 1
    "a float for an int in config.json": ("config.json", lambda c: c.update(bos_token_id=1.0),
                                          "config.json bos_token_id"),  # bos_token_id: 1
    "0 for false in config.json": ("config.json", lambda c: c.update(tie_word_embeddings=0),
                                   "config.json tie_word_embeddings"),
    "index total_size off by one": (INDEX, lambda i: i["metadata"].update(total_size=i["metadata"]["total_size"] + 1),
                                    f"{INDEX} metadata.total_size"),
    "index total_size a list": (INDEX, lambda i: i["metadata"].update(total_size=[]), f"{INDEX} metadata.total_size"),
    "index without metadata": (INDEX, lambda i: i.pop("metadata"), f"{INDEX} metadata.total_size"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_JSON_EDITS))
def test_an_edit_python_would_call_equal_is_a_finding(case, built, cli, tmp_path):
    """JSON compared as JSON (True, 1 and 1.0 are three values to a loader), and the index's total_size checked
    against the shards: each was an edit verify passed. Full and --fast alike."""
    name, edit, where = OUTPUT_JSON_EDITS[case]
    d = copy(built, tmp_path / "d")
    _json_edit(d / name, edit)
    for fast in ([], ["--fast"]):
        r = cli("verify", d, "--json", *fast)
        assert r.exit_code == 1, r.output
        assert [f["where"] for f in json.loads(r.stdout)["findings"]] == [where]


def test_a_recorded_config_that_disagrees_with_the_weights_is_a_finding(built, cli, tmp_path):
    """A directory whose config (config.json and the manifest's record alike, re-signed) no longer fits its
    weights: verify names the tensor."""
    d = copy(built, tmp_path / "d")
    m = json.loads((d / "mpconvert_manifest.json").read_text())
    m["config"]["vocab_size"] = 2048
    _json_edit(d / "config.json", lambda c: c.update(vocab_size=2048))
    resign(d, m)
    r = cli("verify", d, "--json", "--fast")
    assert r.exit_code == 1, r.output
    found = [f["message"] for f in json.loads(r.stdout)["findings"]]
    assert found and all("has shape [1024, 256], but config.json implies [2048, 256]" in f for f in found), found


def _with_metadata(meta):
    def edit(h, data):
        h.pop("__metadata__")
        return dumps(h if meta is None else {"__metadata__": meta, **h}), data
    return edit


@pytest.mark.parametrize("meta", [None, {"format": ""}, {"format": "pt", "note": "x"}, {"format": "np"}])
def test_a_shard_whose_metadata_changed_is_a_finding(meta, built, cli, tmp_path):
    d = edit_header(copy(built, tmp_path / "d"), _with_metadata(meta))
    r = cli("verify", d, "--json", "--fast")
    assert r.exit_code == 1, r.output
    [f] = json.loads(r.stdout)["findings"]
    assert f["where"].endswith(".safetensors") and f"__metadata__ is {meta!r}" in f["message"], f


def test_a_shard_header_laid_out_differently_is_not_a_finding(built, cli, tmp_path):
    """The same header with the metadata last and spaces after separators (another valid writer): verify passes."""
    d = copy(built, tmp_path / "d")
    edit_header(d, lambda h, data: (json.dumps({**{k: v for k, v in h.items() if k != "__metadata__"},
                                                "__metadata__": h["__metadata__"]}), data))
    r = cli("verify", d)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("kind", ["norm", "router", "embedding"])
@pytest.mark.parametrize("module", [f"{L0}.self_attn.q_proj", f"{L0}.mlp.down_proj"])  # FP8, GPTQ
def test_a_quantized_linear_recorded_as_another_kind_is_a_finding(module, kind, built, cli, tmp_path):
    """A re-signed manifest calling a quantized linear a norm, router or embedding: findings naming it (the kind
    its name says; a non-float weight where only floats are served), never a crash reading an FP8 weight as floats
    — full and --fast alike."""
    d = copy(built, tmp_path / "d")
    m = json.loads((d / "mpconvert_manifest.json").read_text())
    m["modules"][module]["kind"] = kind
    resign(d, m)
    for fast in ([], ["--fast"]):
        r = cli("verify", d, "--json", *fast)
        assert r.exit_code == 1, r.output
        found = {(f["check"], f["where"]) for f in json.loads(r.stdout)["findings"]}
        assert ("manifest", module) in found, found
        if module.endswith("q_proj"):  # FP8: a `weight` of F8_E4M3, which no norm, router or embedding may have
            assert ("scheme", module) in found, found


@pytest.mark.parametrize("command", [["verify"], ["verify", "--fast"], ["inspect"], ["serve", "--print-command"]])
def test_every_reader_refuses_a_directory_build_did_not_write_alike(command, llama, cli, tmp_path):
    """verify, inspect and serve said it three ways (inspect of a file: 'f/mpconvert_manifest.json: cannot read (Not
    a directory)'); now one rule, one message each."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for d, match in [(tmp_path / "empty", "no mpconvert_manifest.json; pass a directory written by `mpconvert build`"),
                     (llama["gptq"], "no mpconvert_manifest.json; pass a directory written by `mpconvert build`"),
                     (tmp_path / "file", "not a directory; pass a directory written by `mpconvert build`"),
                     (tmp_path / "missing", "not a directory; pass a directory written by `mpconvert build`")]:
        refused(cli(*command, d), f"{d}: {match}")


def test_verify_usage_errors(built, llama, moe, cli, tmp_path):
    for args, match in [(["--numeric", "--base", tmp_path / "nothing"], "not a model directory"),
                        # a quantized --base was an internal error (transformers asked for optimum)
                        (["--numeric", "--base", llama["gptq"]], "is quantized (gptq); pass the bf16 model"),
                        (["--numeric", "--base", moe["base"]], "config.json model_type='qwen3_moe' but the base has "
                                                               "model_type='llama'"),
                        (["--engine", "sglang", "--tp", "2", "--ep", "4"], "--tp must be a multiple of --ep"),
                        (["--text", tmp_path / "t.txt"], "--text needs --numeric"),
                        (["--tp", "0"], "between 1 and 4096"),
                        (["--threshold", "kl=nan"], "finite number")]:
        r = cli("verify", built, *args)
        assert r.exit_code == 2 and match in " ".join(r.output.split()) and "Traceback" not in r.output, r.output


def test_an_unexpected_error_is_one_line_and_a_log(built, cli, tmp_path, monkeypatch):
    """The guard: what no check foresaw is `internal error: …` on one line, exit 70, the traceback in a log file."""
    import mpconvert.summary

    monkeypatch.setenv("MPCONVERT_CACHE", str(tmp_path))
    monkeypatch.setattr(mpconvert.summary, "load_manifest", lambda d: 1 / 0)
    r = cli("inspect", built)
    assert r.exit_code == 70 and r.output.startswith("internal error: ZeroDivisionError")
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 3
    [log] = (tmp_path / "logs").iterdir()
    assert "Traceback (most recent call last)" in log.read_text() and "ZeroDivisionError" in log.read_text()


def test_kernel_shape_rules_agree_with_sglang(monkeypatch):
    """The FP8-block and AWQ-Marlin shape rules, at TP=1 too, against SGLang 0.5.17's own checks on the same shapes
    (fp8_utils.validate_fp8_block_shape, marlin_utils.verify_marlin_supports_shape): SmolLM2's qkv (576, 192, 192)
    is not whole 128-blocks at any TP."""
    from types import SimpleNamespace

    import sglang.srt.layers.quantization.fp8_utils as fp8_utils
    from sglang.srt.layers.quantization.marlin_utils import verify_marlin_supports_shape

    from mpconvert.formats import FORMATS

    fp8 = {"layout": "ct", "strategy": "block", "block": [128, 128], "activation": "dynamic"}
    awq = {"bits": 4, "group_size": 64, "zero_point": True}
    cases = 0
    for parts, in_f in [([576, 192, 192], 576), ([256, 256, 256], 256), ([1536, 1536], 576), ([576], 1536),
                        ([768, 128, 128], 768), ([512], 384), ([640, 640], 2048)]:
        for tp in (1, 2, 4):
            for column in (True, False):
                if (column and any(p % tp for p in parts)) or (not column and in_f % tp):
                    continue
                out_parts = [p // tp for p in parts] if column else parts
                in_part = in_f if column else in_f // tp
                split_out, split_in = tp > 1 and column, tp > 1 and not column
                # the TP size as SGLang's parallel state would give it (no process group on a CPU test)
                monkeypatch.setattr(fp8_utils, "get_parallel", lambda: SimpleNamespace(tp_size=tp))
                try:
                    fp8_utils.validate_fp8_block_shape(SimpleNamespace(), in_f, sum(parts), in_part, out_parts,
                                                       [128, 128])
                    sglang_fp8 = None
                except ValueError as e:
                    sglang_fp8 = str(e)
                ours = FORMATS["fp8"].kernel_problem(fp8, out_parts, in_part, in_f, split_out, split_in, False)
                # beyond the load-time check: the forward's per_token_group_quant_fp8 asserts K % 128 (found on the
                # GPU: a layer SGLang loads and cannot run)
                runs = in_part % 128 == 0
                assert (ours is None) == (sglang_fp8 is None and runs), (parts, in_f, tp, column, ours, sglang_fp8)
                try:
                    verify_marlin_supports_shape(sum(out_parts), in_part, in_f, 64)
                    sglang_awq = None
                except ValueError as e:
                    sglang_awq = str(e)
                ours = FORMATS["awq"].kernel_problem(awq, out_parts, in_part, in_f, split_out, split_in, False)
                assert (ours is None) == (sglang_awq is None), (parts, in_f, tp, column, ours, sglang_awq)
                cases += 1
    assert cases >= 30


def test_fp8_block_qkv_of_576_is_refused_at_tp1():
    """The shared rule as build and verify run it, on a SmolLM2-shaped attention (hidden 576, 9 heads, 3 KV heads)."""
    from mpconvert.formats import Scheme
    from mpconvert.layout import ModelInfo, role_of
    from mpconvert.rules import Linear, Parallel, partition_problems

    fp8 = Scheme.of("fp8", layout="ct", strategy="block", block=[128, 128], activation="dynamic")
    mods = [Linear(f"model.layers.0.self_attn.{p}_proj", role_of(f"model.layers.0.self_attn.{p}_proj"), fp8, "fp8",
                   "default (fp8)", o, 576) for p, o in (("q", 576), ("k", 192), ("v", 192))]
    info = ModelInfo("llama", 30, 9, 3, 0)
    [p] = partition_problems(mods, info, Parallel())
    assert p.rule == "kernel" and "output part 576" in p.message and "at any TP" in p.message
    gptq = Scheme.of("gptq", bits=4, group_size=64, desc_act=False, sym=True, checkpoint_format="gptq")
    # GPTQ-Marlin: N 960 and K 576 have no thread tile (neither is a multiple of 128; found on the GPU); gate_up's
    # N 3072 takes thread_n 128 with thread_k 64
    [g] = partition_problems([Linear(m.name, m.role, gptq, "g", "x", m.out_features, 576) for m in mods], info,
                             Parallel())
    assert "Marlin has a thread tile for neither" in g.message
    gate_up = [Linear(f"model.layers.0.mlp.{p}_proj", role_of(f"model.layers.0.mlp.{p}_proj"), gptq, "g", "x", 1536,
                      576) for p in ("gate", "up")]
    assert partition_problems(gate_up, info, Parallel()) == []
    # at --tp 3 the same qkv fails as at TP=1: no smaller --tp helps, and the fix says so (it said "use a smaller
    # --tp"); a qkv of 1024 × 3 with 16 heads is whole blocks at TP=1 and at --tp 8, not at --tp 16
    [p] = partition_problems(mods, info, Parallel(3))
    assert p.message.startswith("--tp 3: ") and "at any TP" in p.message and "smaller --tp" not in p.message
    wide = [Linear(m.name, m.role, fp8, "fp8", "x", 1024, 1024) for m in mods]
    wide_info = ModelInfo("llama", 30, 16, 16, 0)
    assert partition_problems(wide, wide_info, Parallel()) == partition_problems(wide, wide_info, Parallel(8)) == []
    [p] = partition_problems(wide, wide_info, Parallel(16))
    assert "use a smaller --tp or another format" in p.message and "at any TP" not in p.message


def test_no_leftovers_in_a_clean_build(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g")
    assert cli("build", r, "-o", tmp_path / "out").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]
