"""Bad input: one clear line naming the file/tensor/rule and the fix, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import build, copy, edited_source, fails, refused, write_recipe

MPCONVERT = str(Path(sys.executable).parent / "mpconvert")  # the installed command: its own streams, its own exit


def test_recipe_missing(cli, tmp_path):
    fails(cli, tmp_path, tmp_path / "nope.yaml", match="recipe not found")


def test_recipe_invalid_yaml(cli, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("base: [unclosed\n")
    fails(cli, tmp_path, p, match="invalid YAML")


BILLION_LAUGHS = "".join(f"{a}: &{a} [{', '.join([f'*{p}' if p else '1'] * 9)}]\n"
                         for p, a in zip(["", *"abcdefgh"], "abcdefghi"))


@pytest.mark.parametrize("text, match", [
    (BILLION_LAUGHS + "base: x\nsources: {x: *i}\ndefault: x\n", "the recipe has 926,177,121 values (more than 1,000,000)"),
    ("base: x\nsources: &s {x: *s}\ndefault: x\n", "inside the value it names never ends"),
    ("base: x\nsources: {x: y}\ndefault: x\nrules: &r [*r]\n", "inside the value it names never ends")])
def test_recipe_yaml_aliases_that_never_end(text, match, cli, tmp_path):
    """YAML aliases share a value: nested nine deep they are ten lines of recipe and 926M values to validate (a build
    ran for a minute and took 8 GB before it was stopped); an alias inside its own value was an internal error."""
    p = tmp_path / "r.yaml"
    p.write_text(text)
    fails(cli, tmp_path, p, match=match)
    refused(cli("plan", p, "--budget", "0.5x", "--calib", p, "-o", tmp_path / "p.yaml"), match)


def test_recipe_yaml_aliases_that_share_a_value_build(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"fp8": "ct-fp8-static", "gptq": "gptq"}, "gptq",
                     '- {match: "self_attn.*", layers: &first 0, source: &fast fp8}\n'
                     '- {match: "mlp.down_proj", layers: *first, source: *fast}')
    m = build(cli, r, tmp_path / "out")
    assert m["modules"]["model.layers.0.mlp.down_proj"]["format"] == "fp8"


@pytest.mark.parametrize("sources, rules, match", [
    # the last of two sources of one name was taken: every module in Int8, no word said
    ({"g": "gptq", "g ": "ct-w8a8"}, "", "line 4: 'g' is written twice in one mapping (first on line 3)"),
    ({"g": "gptq"}, '- {match: "self_attn.*", layers: 0, source: g, layers: 1}',
     "line 6: 'layers' is written twice in one mapping (first on line 6)"),
    ({"g": "gptq"}, '- match: "self_attn.*"\n  source: g\n  match: "mlp.*"',
     "line 8: 'match' is written twice in one mapping (first on line 6)")])
def test_recipe_key_written_twice(sources, rules, match, llama, cli, tmp_path):
    """YAML forbids a key twice in one mapping; PyYAML keeps the last without a word. (write_recipe's "g " is the
    YAML key g: a second line naming it.)"""
    r = write_recipe(tmp_path, llama, sources, "g", rules)
    fails(cli, tmp_path, r, match=match + ", and YAML would keep only the last; remove one")
    refused(cli("plan", r, "--budget", "0.5x", "--calib", r, "-o", tmp_path / "p.yaml"), "written twice")


@pytest.mark.parametrize("value, match", [
    # YAML 1.1 reads these as numbers other than the text says: layer 010 was layer 8, without a word
    ("010", "010 is the number 8 in YAML 1.1 (octal)"), ("0x1", "0x1 is the number 1 in YAML 1.1 (hexadecimal)"),
    ("0b1", "0b1 is the number 1 in YAML 1.1 (binary)"), ("1_0", "1_0 is the number 10 in YAML 1.1 (its _ ignored)"),
    ("1:0", "1:0 is the number 60 in YAML 1.1 (base 60)"), ("[0, 1:0]", "1:0 is the number 60 in YAML 1.1 (base 60)"),
    ("0.5_0", "0.5_0 is the number 0.5 in YAML 1.1 (its _ ignored)")])
def test_recipe_numbers_yaml_reads_otherwise(value, match, llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"g": "gptq"}, "g", f'- {{match: "self_attn.*", layers: {value}, source: g}}')
    fails(cli, tmp_path, r, match=f"line 6: {match}; write numbers in plain decimal, or quote it as text")


@pytest.mark.parametrize("word", ["on", "Off", "YES", "no"])
def test_recipe_yaml11_booleans(word, llama, cli, tmp_path):
    """A source named `on` was the boolean true (then "sources.1: true is not allowed here"); line 4 is `default:
    on`, which the reader meets first."""
    r = write_recipe(tmp_path, llama, {word: "gptq"}, word)
    fails(cli, tmp_path, r, match=f"line 4: {word} is the boolean {str(word.lower() in ('on', 'yes')).lower()} in "
                                  f"YAML 1.1; quote it ('{word}') for the text, or write true or false")
    r.write_text(r.read_text().replace(f"{word}:", f"'{word}':").replace(f"default: {word}", f"default: '{word}'"))
    assert build(cli, r, tmp_path / "out")["sources"][word]


def test_recipe_merge_keys_may_be_overridden(llama, cli, tmp_path):
    """`<<: *rule` then a key of its own is what a YAML merge is for, not a key written twice."""
    r = write_recipe(tmp_path, llama, {"fp8": "ct-fp8-static", "gptq": "gptq"}, "gptq",
                     '- &attn {match: "self_attn.*", layers: 0, source: fp8}\n- {<<: *attn, match: "mlp.down_proj"}')
    m = build(cli, r, tmp_path / "out")["modules"]
    assert [m[f"model.layers.{i}.{s}"]["format"] for s in ("self_attn.o_proj", "mlp.down_proj") for i in (0, 1)] \
        == ["fp8", "gptq", "fp8", "gptq"]


def test_recipe_unknown_key_points_at_it(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq", '- {match: "*", source: gptq, layer: 1}')
    fails(cli, tmp_path, r, match="rules.0.layer: unknown key")


def test_recipe_unknown_source(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq", '- {match: "*", source: fp9}')
    fails(cli, tmp_path, r, match="rules[0].source: unknown source 'fp9' (known: gptq, base)")


@pytest.mark.parametrize("key,value", [("layers", '"3-1"'), ("experts", '"a-b"')])
def test_recipe_bad_range(key, value, llama, cli, tmp_path):
    """A layer or expert range that does not parse names its key (the message called an expert range a layer
    range)."""
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq", f'- {{match: "*", {key}: {value}, source: gptq}}')
    fails(cli, tmp_path, r, match=f"rules.0.{key}: bad range {value.strip(chr(34))!r}")


@pytest.mark.parametrize("match,message", [("[]", "rules.0.match: names no patterns; give one"),
                                           ('""', "rules.0.match: empty pattern; give a glob"),
                                           ('["self_attn.*", ""]', "rules.0.match: empty pattern")])
def test_rule_with_no_pattern(llama, cli, tmp_path, match, message):
    """An empty list of patterns was taken, and the rule then 'selected nothing'."""
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq", f"- {{match: {match}, source: gptq}}")
    fails(cli, tmp_path, r, match=message)


def test_rule_matching_nothing(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq", '- {match: "*.cross_attn.*", source: base}')
    fails(cli, tmp_path, r, match="rules[0] (match '*.cross_attn.*' → base) selects nothing: it matches no module")


@pytest.mark.parametrize("rule,match", [
    ('- {match: "self_attn.*", layers: 0-31, source: gptq}',
     "rules[0] (match 'self_attn.*' layers=0-31 → gptq) names layers 2-31, which the model lacks (it has layers 0-1); "
     "fix the rule's layers"),
    ('- {match: "mlp.down_proj", layers: "1,5,7-9", source: gptq}', "names layers 5,7-9, which the model lacks"),
    ('- {match: "mlp.down_proj", layers: 2, source: gptq}', "names layer 2, which the model lacks (it has layers 0-1)"),
    ('- {match: "model.embed_tokens", source: gptq}',
     "selects nothing: it matches only modules that are not linear layers (model.embed_tokens: an embedding); rules "
     "choose where linear layers come from — norms, routers and embeddings follow the linears that read them; fix or "
     "remove the rule (linear modules look like 'model.layers.0."),
    ('- {match: "model.norm", source: gptq}', "(model.norm: a norm)"),
])
def test_rule_naming_what_the_model_lacks(llama, cli, tmp_path, rule, match):
    """A rule naming layers past the model (a recipe written for a larger one) is refused, not cut to fit, as a rule
    naming experts past it is; a rule naming only embeddings or norms says that rules choose linear layers — where it
    said 'it matches no module (module names look like 'model.embed_tokens')', the very name it had matched."""
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq", rule)
    fails(cli, tmp_path, r, match=match)


def test_rule_shadowed_by_earlier_rule(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq",
                     '- {match: "*", source: gptq}\n- {match: "lm_head", source: base}')
    fails(cli, tmp_path, r, match="every module it matches is taken by an earlier rule")


def test_source_dir_missing(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    r.write_text(r.read_text().replace(str(llama["gptq"]), str(tmp_path / "missing")))
    fails(cli, tmp_path, r, match="is not a directory; fix the path in the recipe")


def test_pickle_weights_are_refused(llama, cli, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(llama["gptq"] / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not-to-be-unpickled")
    r = write_recipe(tmp_path, {**llama, "p": src}, {"p": "p"}, "p")
    fails(cli, tmp_path, r, match="holds only pickle weights (pytorch_model.bin); mpconvert never unpickles")


def test_index_path_escaping_source_dir(llama, cli, tmp_path):
    src = copy(llama["gptq"], tmp_path / "evil")
    keys = json.loads(subprocess.check_output([sys.executable, "-c", f"""
import json,struct; f=open({str(src / 'model.safetensors')!r},'rb'); n=struct.unpack('<Q',f.read(8))[0]
print(json.dumps([k for k in json.loads(f.read(n)) if k!='__metadata__']))"""]))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../../etc/x.safetensors"
                                                                                  for k in keys}}))
    r = write_recipe(tmp_path, {**llama, "e": src}, {"e": "e"}, "e")
    fails(cli, tmp_path, r, match="escapes the checkpoint directory")


DEEP = "[" * 100_000 + "]" * 100_000  # past both JSON decoders' recursion


@pytest.mark.parametrize("file, text, match", [
    *(("model.safetensors.index.json", t, "cannot parse safetensors index") for t in (
        '{"weight_map": {"a": NaN}}', '{"weight_map": {"a": "\\ud800"}}', '{"weight_map": {}} trailing',
        '\ufeff{"weight_map": {}}', '{"weight_map": {"a"')),
    ("model.safetensors.index.json", '{"weight_map": ' + DEEP + "}", "safetensors index is nested deeper than"),
    ("config.json", None, "config.json is nested deeper than")])
def test_a_json_file_that_is_not_json(file, text, match, llama, cli, tmp_path):
    """The index is read as strict JSON (in C: 177k entries at DeepSeek-V3 size): what Python's json would accept
    (NaN) or not (a lone surrogate, trailing text, a byte-order mark, a cut) is one line naming the file, in a
    source and in a built directory; so is an index or config.json nested past the decoders' recursion (an internal
    error before)."""
    def spoil(d: Path) -> None:
        p = d / file
        p.write_text(text if text is not None else p.read_text().rstrip().rstrip("}") + ', "deep": ' + DEEP + "}")

    src = copy(llama["gptq"], tmp_path / "idx")
    spoil(src)
    r = write_recipe(tmp_path, {**llama, "e": src}, {"e": "e"}, "e")
    line = fails(cli, tmp_path, r, match=match)
    assert str(src / file) in line
    out = tmp_path / "built"
    build(cli, write_recipe(tmp_path, llama, {"q": "gptq"}, "q"), out)
    spoil(out)
    r = cli("verify", out, "--json")
    findings = json.loads(r.output)["findings"]
    assert r.exit_code == 1 and len(findings) == 1, findings  # (not one more per tensor the index would place)
    assert findings[0]["where"] == file and match in findings[0]["message"], findings


def test_truncated_shard(llama, cli, tmp_path):
    src = copy(llama["ct-fp8-static"], tmp_path / "trunc")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])
    r = write_recipe(tmp_path, {**llama, "t": src}, {"t": "t"}, "t")
    fails(cli, tmp_path, r, match="truncated: tensor")


def test_corrupt_header(llama, cli, tmp_path):
    src = copy(llama["ct-fp8-static"], tmp_path / "corrupt")
    f = src / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[8] = ord("#")
    f.write_bytes(bytes(b))
    r = write_recipe(tmp_path, {**llama, "c": src}, {"c": "c"}, "c")
    fails(cli, tmp_path, r, match="header is not valid JSON")


def test_unknown_quant_method(llama, cli, tmp_path):
    src = copy(llama["gptq"], tmp_path / "odd")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "hqq"
    (src / "config.json").write_text(json.dumps(cfg))
    r = write_recipe(tmp_path, {**llama, "o": src}, {"o": "o"}, "o")
    fails(cli, tmp_path, r, match="quant_method 'hqq' is not supported")


def test_architecture_mismatch(llama, moe, cli, tmp_path):
    r = write_recipe(tmp_path, {**llama, "m": moe["gptq"]}, {"m": "m"}, "m")
    fails(cli, tmp_path, r, match="config.json model_type='qwen3_moe' but the base has model_type='llama'")


def test_quantized_base_is_refused(llama, cli, tmp_path):
    r = write_recipe(tmp_path, {**llama, "base": llama["gptq"]}, {"g": "gptq"}, "g")
    fails(cli, tmp_path, r, match="is quantized (gptq); the base must be the bf16/fp16 model")


def test_fused_unit_mixing_formats(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq", "fp8": "ct-fp8-static"}, "gptq",
                     '- {match: "self_attn.q_proj", source: fp8}')
    t = fails(cli, tmp_path, r, match="fused unit model.layers.0.self_attn.qkv_proj mixes formats")
    assert "q_proj=fp8 tensor act=static (ct) from 'fp8' via rules[0]" in t and "default (gptq)" in t


def test_awq_v_and_o_split(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq", "awq": "awq"}, "gptq",
                     '- {match: "self_attn.[qkv]_proj", layers: 0, source: awq}')
    fails(cli, tmp_path, r, match="folds o_proj's input scales into v_proj — take both from the same source")


def test_awq_up_and_down_split(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq", "awq": "awq"}, "gptq",
                     '- {match: "mlp.down_proj", layers: 1, source: awq}')
    fails(cli, tmp_path, r, match="folds down_proj's input scales into up_proj")


def test_smoothed_norm_with_unsmoothed_consumer(llama, cli, tmp_path):
    # same scheme (int8) so the fused unit is fine — but the smoothed source changed input_layernorm for q only
    r = write_recipe(tmp_path, llama, {"int8": "ct-w8a8", "smooth": "ct-w8a8-smooth"}, "int8",
                     '- {match: "self_attn.q_proj", layers: 0, source: smooth}')
    fails(cli, tmp_path, r, match="folded scales: model.layers.0.input_layernorm differs between the sources")


@pytest.mark.parametrize("nudge, match", [(0.0, None), (2.0**-20, "model.layers.0.input_layernorm differs")])
def test_a_norm_stored_in_another_float_dtype(nudge, match, llama, cli, tmp_path):
    """A source that stores a norm in F32 (AWQ checkpoints: F16) with the base's values holds the same norm — q from
    it and k/v from another source agree, and the norm is the base's BF16 bytes; nudged by 2^-20 (below BF16's
    precision, visible in F32) it is a different norm, refused like a smoothed one."""
    import torch

    name = "model.layers.0.input_layernorm.weight"

    def in_f32(t):
        t[name] = t[name].to(torch.float32) * (1 + nudge)

    src = edited_source(llama["ct-w8a8"], tmp_path / "f32", in_f32)
    r = write_recipe(tmp_path, {**llama, "f32": src}, {"int8": "ct-w8a8", "f32": "f32"}, "int8",
                     '- {match: "self_attn.q_proj", layers: 0, source: f32}')
    if match:
        return fails(cli, tmp_path, r, match=match)
    m = build(cli, r, tmp_path / "out")
    assert m["modules"]["model.layers.0.input_layernorm"]["source"] == "base"
    assert m["modules"]["model.layers.0.input_layernorm"]["tensors"]["weight"]["dtype"] == "BF16"


def test_tp_that_cannot_shard(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    fails(cli, tmp_path, r, "--tp", "4", match="--tp 4: model.layers.0.self_attn.o_proj (gptq int4 g128")
    fails(cli, tmp_path, r, "--tp", "3", match="--tp 3: num_attention_heads=4 is not divisible by 3")


def test_existing_output_needs_force(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    out = tmp_path / "out"
    assert cli("build", r, "-o", out).exit_code == 0
    first = (out / "mpconvert_manifest.json").stat().st_ino
    fails(cli, tmp_path, r, match="already exists; choose another -o or pass --force", out=out)
    assert (out / "mpconvert_manifest.json").stat().st_ino == first
    assert cli("build", r, "-o", out, "--force").exit_code == 0  # an earlier output: replaced
    assert (out / "mpconvert_manifest.json").stat().st_ino != first


def _home_like(d: Path) -> Path:
    d.mkdir()
    (d / ".bashrc").write_text("precious")
    (d / "project").mkdir()
    (d / "project" / "notes.txt").write_text("precious")
    return d


@pytest.mark.parametrize("case", ["a home directory", "an output with a file added", "an output with a directory "
                                  "added", "a symbolic link to an output", "a directory with a stray manifest"])
def test_force_replaces_only_an_earlier_output(case, llama, cli, tmp_path):
    """`-o ~ --force` (a typo away from `-o ~/out`) replaced the home directory. --force now replaces only an empty
    directory or what build wrote: its manifest and nothing build does not write; everything else is refused and
    left as it was."""
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    out = tmp_path / "out"
    if case == "a home directory":
        _home_like(out)
        match = "is not an earlier output of mpconvert build (it holds no mpconvert_manifest.json)"
    elif case == "a directory with a stray manifest":
        _home_like(out)
        (out / "mpconvert_manifest.json").write_text("{}")
        match = "it holds .bashrc, project, which build does not write"
    else:
        built = tmp_path / "built"
        assert cli("build", r, "-o", built).exit_code == 0
        if case == "a symbolic link to an output":
            out.symlink_to(built)
            match = "is a symbolic link; --force replaces only a directory"
        else:
            built.rename(out)
            if "file" in case:
                (out / "notes.txt").write_text("mine")
            else:
                (out / "results").mkdir()
            match = f"it holds {'notes.txt' if 'file' in case else 'results'}, which build does not write"
    before = tree(tmp_path)
    fails(cli, tmp_path, r, "--force", match=match, out=out)
    assert tree(tmp_path) == before


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() and not p.is_symlink() else str(p.readlink())
                                    if p.is_symlink() else None) for p in sorted(d.rglob("*"))}


def test_force_replaces_an_empty_directory(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    (tmp_path / "out").mkdir()
    assert cli("build", r, "-o", tmp_path / "out", "--force").exit_code == 0


def test_output_inside_a_source(llama, cli, tmp_path):
    src = copy(llama["gptq"], tmp_path / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    fails(cli, tmp_path, r, match="overlaps source 's'", out=src / "out")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_bad_shard_size(llama, cli, tmp_path):
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    fails(cli, tmp_path, r, "--shard-size", "lots", match="bad size 'lots'")


def test_write_failure_leaves_nothing(llama, tmp_path):
    """A write that fails midway (file-size limit standing in for a full disk) leaves no partial output."""
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    p = subprocess.run([MPCONVERT, "build", str(r), "-o", str(tmp_path / "out")], capture_output=True, text=True,
                       preexec_fn=limit)
    assert p.returncode == 2, p.stderr
    assert "write failed" in p.stderr and "nothing was written" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
    assert not [x for x in tmp_path.iterdir() if "mpconvert-tmp" in x.name]


def test_source_with_a_quantized_router(moe, cli, tmp_path):
    """A source whose producer also quantized the router (mlp.gate): SGLang runs routers unquantized, so it could not
    be served — refused by name, with the fix."""
    import torch

    def int8_router(sd):
        w = sd.pop("model.layers.0.mlp.gate.weight").float()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        sd["model.layers.0.mlp.gate.weight"] = (w / scale).round().to(torch.int8)
        sd["model.layers.0.mlp.gate.weight_scale"] = scale.to(torch.bfloat16)

    src = edited_source(moe["ct-w8a8"], tmp_path / "int8-router", int8_router)
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["ignore"] = [x for x in qc["ignore"] if "mlp.gate" not in x]
    (src / "config.json").write_text(json.dumps(cfg))
    r = write_recipe(tmp_path, moe, {"gptq": "gptq"}, "gptq", '- {match: "mlp.experts.*", layers: 0, source: int8}')
    r.write_text(r.read_text().replace("sources:\n", f"sources:\n  int8: {src}\n"))
    fails(cli, tmp_path, r, match="source 'int8' quantized the router model.layers.0.mlp.gate (int8); SGLang keeps "
                                  "routers unquantized")


@pytest.mark.parametrize("extra", ["model.layers.0.mlp.down_proj.foo", "weight", "model.layers.0.mlp.",
                                   "lm_head.qweight2"])
def test_a_tensor_of_an_unknown_kind(extra, llama, cli, tmp_path):
    """A tensor whose suffix no format knows, or with no module before it: refused by name, never guessed (the
    names are split column by column; the message must still name the first such tensor)."""
    import torch

    src = edited_source(llama["gptq"], tmp_path / "src", lambda sd: sd.update({extra: torch.zeros(2)}))
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    fails(cli, tmp_path, r, match=f"tensor {extra!r} is of a kind mpconvert does not know")


def _fused(parts: tuple[str, ...], into: str):
    """An edit that stores every layer's `parts` projections as one tensor of each kind named `into`, concatenated
    along the output rows (as Phi-3 checkpoints store q/k/v and gate/up; a per-tensor scale kept once)."""
    import torch

    def fuse(sd):
        for name in [k for k in sd if f".{parts[0]}." in k]:
            pfx, kind = name.split(f"{parts[0]}.")
            ts = [sd.pop(f"{pfx}{p}.{kind}") for p in parts]
            sd[f"{pfx}{into}.{kind}"] = ts[0] if ts[0].numel() == 1 else torch.cat(ts)

    return fuse


@pytest.mark.parametrize("who,parts,into,match", [
    ("base", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.qkv_proj",
     "base: module 'model.layers.0.self_attn.qkv_proj' holds q, k and v fused in one tensor (as Phi-3 and Phi-4 "
     "checkpoints store them), which mpconvert does not take: it reads q_proj/k_proj/v_proj and gate_proj/up_proj"),
    ("base", ("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_up_proj",
     "base: module 'model.layers.0.mlp.gate_up_proj' holds gate and up fused in one tensor"),
    ("ct-fp8-static", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.query_key_value",
     "source 's': module 'model.layers.0.self_attn.query_key_value' holds q, k and v fused in one tensor"),
    ("base", ("mlp.down_proj",), "mlp.fc_out",
     "base: module 'model.layers.0.mlp.fc_out' has no known role: mpconvert knows the module names of the "
     "architectures its README lists"),
])
def test_a_module_no_rule_names(who, parts, into, match, llama, cli, tmp_path):
    """A module whose name gives no role — a checkpoint that stores q/k/v or gate/up fused (Phi-3, Phi-4: gptqmodel
    7.6 keeps their qkv_proj fused, and splits gate_up_proj) or any name mpconvert does not know — is refused by
    name, saying which layout it reads (the message named six architectures and no fused layout)."""
    edited = edited_source(llama[who], tmp_path / who, _fused(parts, into))
    fixtures = {**llama, "base" if who == "base" else "s": edited}
    fails(cli, tmp_path, write_recipe(tmp_path, fixtures, {"s": "ct-fp8-static"} if who == "base" else {"s": "s"},
                                      "s"), match=match)


def _narrower_mlp(src: Path, dst: Path, intermediate: int) -> Path:
    """A copy of a tiny-Llama checkpoint whose MLPs keep the first `intermediate` channels (the quantizer's own int8
    values and per-channel scales, sliced: still a valid W8A8 layer), its config saying so."""
    def narrower(sd):
        for k in list(sd):
            if ".mlp.gate_proj." in k or ".mlp.up_proj." in k:
                sd[k] = sd[k][:intermediate].contiguous()
            elif k.endswith("mlp.down_proj.weight"):
                sd[k] = sd[k][:, :intermediate].contiguous()

    edited_source(src, dst, narrower)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "intermediate_size": intermediate}))
    return dst


def test_an_int8_layer_that_sglangs_int8_gemm_cannot_take(llama, cli, tmp_path):
    """SGLang runs a dense W8A8-Int8 layer on sgl_kernel's int8_scaled_mm, which wants K % 16 and N % 8 and fails the
    first forward otherwise (after loading). A Llama whose MLP is 272 wide (the llm-compressor output's bytes,
    sliced): whole, down_proj's K is 272 and builds; at --tp 2 it is 136 per rank — refused, naming the smaller --tp
    or another format (DeepSeek-V2-Lite's dense MLP, 10944 wide, is 1368 per rank at --tp 8: the same)."""
    from mpconvert.formats.int8 import INT8_FORMAT

    fx = {"base": _narrower_mlp(llama["base"], tmp_path / "base", 272),
          "int8": _narrower_mlp(llama["ct-w8a8"], tmp_path / "int8", 272)}
    r = write_recipe(tmp_path, fx, {"int8": "int8"}, "int8")
    assert cli("build", r, "-o", tmp_path / "out").exit_code == 0
    said = fails(cli, tmp_path, r, "--tp", "2", match="--tp 2: model.layers.0.mlp.down_proj (int8 w8a8",
                 out=tmp_path / "o2")
    assert "input size 136 is not a multiple of 16 (SGLang's int8 GEMM, sgl_kernel int8_scaled_mm, needs K % 16 " \
           "and N % 8); use a smaller --tp or another format" in said
    v = cli("verify", tmp_path / "out", "--tp", "2", "--fast", "--json")
    assert v.exit_code == 1 and {f["where"] for f in json.loads(v.stdout)["findings"]} == \
        {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    p = {"layout": "ct", "activation": "dynamic"}  # N: a fused output not a multiple of 8; MoE experts: any shape
    assert "output size 1372 is not a multiple of 8" in INT8_FORMAT.kernel_problem(p, [686, 686], 256, 256, True,
                                                                                    False, False)
    assert INT8_FORMAT.kernel_problem(p, [68, 68], 136, 136, True, False, True) is None


@pytest.mark.parametrize("extra,scheme", [("model.layers.1.self_attn.k_scale", True),
                                          ("model.layers.0.self_attn.v_scale", False),
                                          ("model.layers.0.self_attn.k_proj.output_scale", False),
                                          ("model.layers.1.self_attn.kv_scale", False)])
def test_a_source_with_kv_cache_scales(extra, scheme, llama, cli, tmp_path):
    """A source that quantized the KV cache too (llm-compressor's kv_cache_scheme; older exports' names): its scales
    cannot be dropped quietly (SGLang would take 1.0 under --kv-cache-dtype fp8), nor carried: refused, saying so."""
    import torch

    src = edited_source(llama["ct-fp8-static"], tmp_path / "src", lambda sd: sd.update({extra: torch.tensor(0.05)}))
    if scheme:
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                         "dynamic": False, "symmetric": True}
        (src / "config.json").write_text(json.dumps(cfg))
    r = write_recipe(tmp_path, {**llama, "s": src}, {"s": "s"}, "s")
    said = fails(cli, tmp_path, r, match=f"tensor {extra!r} is a KV-cache quantization scale")
    assert ("(config.json's kv_cache_scheme)" in said) == scheme and "without a KV-cache scheme" in said


@pytest.mark.parametrize("args", [("build", "{r}", "-o", ""), ("build", "{r}", "--output="), ("build", ""),
                                  ("inspect", ""), ("verify", ""), ("verify", "{out}", "--numeric", "--base", ""),
                                  ("serve", "", "--print-command")])
def test_an_empty_path_is_refused(args, llama, cli, tmp_path, monkeypatch):
    """An empty path would be the current directory: refused by name (not `. already exists`, not acted on)."""
    monkeypatch.chdir(tmp_path)
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    res = cli(*(a.format(r=r, out=tmp_path) for a in args))
    assert res.exit_code == 2
    assert "an empty path (it would mean the current directory); give a path" in res.output
    assert "Traceback" not in res.output and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


LONG_NAME, LONG_PATH = "n" * 256, "/".join(["d" * 200] * 21)  # one name over 255 bytes; 4220 bytes in all


@pytest.mark.parametrize("long", [LONG_NAME, LONG_PATH], ids=["name", "path"])
@pytest.mark.parametrize("args", [
    ("build", "{long}"), ("build", "{recipe}", "-o", "{long}"), ("build", "{recipe}", "-o", "{tmp}/new/{long}"),
    ("inspect", "{long}"), ("verify", "{long}"), ("verify", "{out}", "--numeric", "--base", "{long}"),
    ("verify", "{out}", "--numeric", "--base", "{base}", "--text", "{long}"), ("serve", "{long}", "--print-command"),
    ("plan", "{long}", "--budget", "0.6x", "--calib", "{text}", "-o", "{tmp}/r.yaml"),
    ("plan", "{sources}", "--budget", "0.6x", "--calib", "{long}", "-o", "{tmp}/r.yaml"),
    ("plan", "{sources}", "--budget", "0.6x", "--calib", "{text}", "-o", "{long}"),
    ("plan", "{sources}", "--budget", "0.6x", "--calib", "{text}", "-o", "{tmp}/r.yaml", "--frontier", "{long}"),
    ("demo", "{long}")])
def test_a_path_too_long_for_the_file_system_is_refused(args, long, llama, cli, tmp_path):
    """pathlib's exists() and is_dir() raise on a name over 255 bytes or a path over 4095 instead of answering: nine
    of these twelve arguments were an internal error. Refused by name, as an empty path is."""
    (tmp_path / "s").mkdir()
    paths = {**_built(llama, cli, tmp_path), "long": long, "base": llama["base"],
             "text": "/usr/share/common-licenses/GPL-3", "sources": write_recipe(tmp_path / "s", llama, {}, "base")}
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli(*(a.format(**paths) for a in args))
    assert res.exit_code == 2, res.output
    assert "longer than the file system allows" in res.output and "give a shorter path" in res.output, res.output
    assert "Traceback" not in res.output and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("field", ["base", "source", "routing file"])
def test_a_recipe_path_too_long_for_the_file_system_is_refused(field, moe, cli, tmp_path):
    """The same paths written in a recipe: refused where they are written (each was an internal error)."""
    sources = {"gptq": "gptq"}
    rules = "- {match: 'mlp.experts.*', experts: {file: routing.json, top: 2}, source: base}"
    r = write_recipe(tmp_path, moe, sources, "gptq", rules)
    text = r.read_text()
    old = {"base": str(moe["base"]), "source": str(moe["gptq"]), "routing file": "routing.json"}[field]
    r.write_text(text.replace(old, LONG_PATH if field == "base" else LONG_NAME))
    where = {"base": "base", "source": "sources: gptq", "routing file": "rules.0.experts: file"}[field]
    fails(cli, tmp_path, r, match=f"recipe.yaml: {where}: longer than the file system allows")


def test_a_path_that_is_not_utf8(llama, cli, tmp_path):
    """A name that is not UTF-8 reaches Python as surrogates: `build -o` on one was a crash (its lock file's name was
    encoded strictly) whose crash log failed too, putting a traceback on the terminal. SGLang's loader cannot open
    files under such a path ("Path … is not valid UTF-8", seen with verify --engine): build, serve and verify
    --engine refuse it in one line; verify and inspect read it; the recipe's own name may be anything."""
    def named(raw: bytes) -> Path:
        return Path(os.fsdecode(os.fsencode(tmp_path) + raw))

    (named(b"/r\xff")).mkdir()
    r = write_recipe(named(b"/r\xff"), llama, {"gptq": "gptq"}, "gptq")
    assert cli("build", r, "-o", tmp_path / "out").exit_code == 0
    refused(cli("build", r, "-o", named(b"/o\xff")),
            "is not a UTF-8 path, and SGLang's loader (safetensors) opens no file under one ('Path … is not valid "
            "UTF-8'); choose a UTF-8 name")
    assert not named(b"/o\xff").exists() and not [p for p in tmp_path.iterdir() if "mpconvert" in p.name]
    moved = named(b"/moved\xfe")
    (tmp_path / "out").rename(moved)
    assert cli("verify", moved).exit_code == 0 and cli("inspect", moved, "--json").exit_code == 0
    refused(cli("serve", moved, "--print-command"), "SGLang cannot serve it: b'")
    refused(cli("verify", moved, "--engine", "sglang"), "--engine sglang: b'")


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_terminal_that_cannot_show_every_character(encoding, llama, cli, tmp_path):
    """Under PYTHONIOENCODING=ascii or a Latin-1 locale, the first arrow or dash a command printed was a
    UnicodeEncodeError — an internal error halfway through a report. Now such a character is written escaped."""
    paths = _built(llama, cli, tmp_path)
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    for args in (("inspect", "{out}"), ("build", "{recipe}", "-o", "{new}"), ("verify", "{out}"), ("build", "--help")):
        p = subprocess.run(_command(args, paths), capture_output=True, text=True, env=env, errors="replace")
        assert p.returncode == 0 and "internal error" not in p.stderr, (args, p.stderr)
    p = subprocess.run(_command(("inspect", "{out}", "--no-modules"), paths), capture_output=True, text=True, env=env,
                       encoding=encoding)
    assert "default (gptq): 15 linear modules in layers 0-1" in p.stdout, p.stdout
    assert ("0.476 \\xd7 its bf16 size" if encoding == "ascii" else "0.476 \xd7 its bf16 size") in p.stdout, p.stdout


def test_the_crash_log_takes_any_argument(tmp_path, monkeypatch):
    from mpconvert.cli.main import _write_crash_log

    monkeypatch.setenv("MPCONVERT_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["mpconvert", "build", "r\udcff.yaml"])
    try:
        raise RuntimeError("the error")
    except RuntimeError:
        log = Path(_write_crash_log())
    assert log.parent == tmp_path / "logs"
    text = log.read_text()
    assert text.startswith("mpconvert build r\\udcff.yaml\n") and "RuntimeError: the error" in text


def _built(llama, cli, tmp_path: Path) -> dict[str, Path]:
    """A recipe and its built output; the placeholders the tests' argument lists name ({new}: not there yet)."""
    recipe = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    assert cli("build", recipe, "-o", tmp_path / "out").exit_code == 0
    return {"recipe": recipe, "out": tmp_path / "out", "new": tmp_path / "new", "tmp": tmp_path}


def _command(args, paths: dict[str, Path]) -> list[str]:
    return [MPCONVERT, *(a.format(**paths) for a in args)]


@pytest.mark.parametrize("args", [("inspect", "{out}"), ("inspect", "{out}", "--json"), ("verify", "{out}"),
                                  ("verify", "{out}", "--json"), ("--help",)])
def test_a_reader_that_left_ends_quietly(args, llama, cli, tmp_path):
    """`mpconvert inspect out/ | head`: the reader closes the pipe; mpconvert stops with exit 141 (as a program ended
    by SIGPIPE; not 1, verify's "problems found") and no traceback."""
    p = subprocess.Popen(_command(args, _built(llama, cli, tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before mpconvert writes a byte
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "error" not in stderr


def test_a_build_whose_reader_left_leaves_no_partial_output(llama, tmp_path):
    """Both pipes closed at once (`mpconvert build … 2>&1 | head -0`): build stops at its first line of progress with
    exit 141 and leaves no output and no temporary directory."""
    r = write_recipe(tmp_path, llama, {"gptq": "gptq"}, "gptq")
    p = subprocess.Popen([MPCONVERT, "build", str(r), "-o", str(tmp_path / "out")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    p.stderr.close()
    assert p.wait(timeout=120) == 141
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("args", [("inspect", "{out}"), ("inspect", "{out}", "--json"), ("verify", "{out}"),
                                  ("verify", "{out}", "--json"), ("serve", "{out}", "--print-command"), ("--help",),
                                  ("build", "{recipe}", "-o", "{new}", "--json")])
def test_output_that_cannot_be_written_is_an_error(args, buffered, llama, cli, tmp_path):
    """Standard output on a full disk (`mpconvert verify out/ --json > report.json`): one `error:` line and exit 2 —
    not an internal error, and never exit 0 with the report lost (a buffered stdout's last flush failed unseen)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED" or not buffered}
    with open("/dev/full", "w") as full:
        p = subprocess.run(_command(args, _built(llama, cli, tmp_path)), stdout=full, stderr=subprocess.PIPE,
                           text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert lines == ["error: could not write to standard output (No space left on device); what it received is "
                     "incomplete — free space or send it elsewhere"], p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [("build", "{recipe}", "-o", "{new}", "--json"), ("verify", "{out}", "--json"),
                                  ("inspect", "{out}", "--json")])
def test_json_mode_writes_nothing_to_stderr(args, llama, cli, tmp_path):
    """With --json, stdout is the JSON document and stderr stays empty (a disabled progress bar wrote a newline)."""
    p = subprocess.run(_command(args, _built(llama, cli, tmp_path)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    json.loads(p.stdout)


@pytest.mark.parametrize("args, code", [(("verify", "{out}"), 0), (("verify", "{tmp}/nowhere"), 2),
                                        (("build", "{recipe}", "-o", "{new}"), 0), (("inspect", "{out}"), 0)])
def test_stderr_that_cannot_be_written_changes_nothing(args, code, llama, cli, tmp_path):
    """Standard error on a full disk: the progress bar and messages are lost, the command's work and exit code are
    not (a verify that passed exited 1, a usage error 1, from an exception raised while reporting another)."""
    with open("/dev/full", "w") as full:
        p = subprocess.run(_command(args, _built(llama, cli, tmp_path)), stdout=subprocess.DEVNULL, stderr=full,
                           timeout=120)
    assert p.returncode == code
    if args[0] == "build":
        assert cli("verify", tmp_path / "new").exit_code == 0
