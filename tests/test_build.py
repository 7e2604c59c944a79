"""build on real producer outputs: mixed dense and MoE checkpoints from ≥3 formats, checked byte- and value-exact."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from mpconvert.checkpoint import Checkpoint
from mpconvert.formats import Scheme
from mpconvert.manifest import MANIFEST
from mpconvert.numeric import dequantize, dequantize_from_manifest
from mpconvert.sources import open_source

from helpers import DENSE_RULES, build, check_faithful, write_recipe


def test_dense_mixed_four_formats(llama, cli, tmp_path):
    sources = {"fp8": "ct-fp8-static", "int8": "ct-w8a8", "gptq": "gptq", "awq": "awq", "fp8blk": "native-fp8-block"}
    recipe = write_recipe(tmp_path, llama, sources, "gptq", DENSE_RULES)
    m = build(cli, recipe, tmp_path / "out")
    units = m["units"]
    assert units["model.layers.0.self_attn.qkv_proj"]["format"] == "fp8"
    assert units["model.layers.0.mlp.gate_up_proj"]["format"] == "int8"
    assert units["model.layers.1.self_attn.qkv_proj"]["format"] == "awq"
    assert units["model.layers.1.mlp.down_proj"]["format"] == "gptq"
    assert units["lm_head"]["format"] == "unquantized"  # llm-compressor leaves lm_head in bf16
    # AWQ folded its scales into layer 1's input norm: that norm must come from the AWQ source; the others from base
    assert m["modules"]["model.layers.1.input_layernorm"]["source"] == "awq"
    assert m["modules"]["model.layers.0.input_layernorm"]["source"] == "base"
    assert m["modules"]["model.layers.1.post_attention_layernorm"]["source"] == "base"
    worst = check_faithful(tmp_path / "out", m, llama, sources, "llama")
    print("worst error / RTN error, dense:", worst)
    assert set(worst) >= {"fp8", "int8", "gptq", "awq"}
    # the official safetensors library reads every shard
    for f in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                fh.get_tensor(k)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mpconvert"
    assert cfg["quantization_config"]["manifest_sha256"] == hashlib.sha256(
        (tmp_path / "out" / MANIFEST).read_bytes()).hexdigest()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (llama["base"] / "tokenizer.json").read_bytes()


def test_build_is_deterministic_and_shards_by_size(llama, cli, tmp_path):
    sources = {"fp8": "ct-fp8-static", "int8": "ct-w8a8", "gptq": "gptq", "awq": "awq", "fp8blk": "native-fp8-block"}
    recipe = write_recipe(tmp_path, llama, sources, "gptq", DENSE_RULES)
    build(cli, recipe, tmp_path / "a", "--shard-size", "600KB")
    build(cli, recipe, tmp_path / "b", "--shard-size", "600KB")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    shards = sorted((tmp_path / "a").glob("model-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for p in shards:  # a shard exceeds the cap only when it holds a single tensor larger than the cap
        n = len([1 for v in index["weight_map"].values() if v == p.name])
        assert p.stat().st_size <= 600_000 + 8192 or n == 1


def test_native_layouts_and_dynamic_fp8(llama, cli, tmp_path):
    """Native per-tensor FP8 (static), SGLang-native w8a8_int8 and compressed-tensors dynamic FP8 in one model."""
    sources = {"nfp8": "native-fp8-tensor", "nint8": "native-w8a8", "dyn": "ct-fp8-dynamic", "gptq": "gptq"}
    rules = """
    - {match: "self_attn.*", layers: 0, source: nfp8}
    - {match: "mlp.*", layers: 0, source: nint8}
    - {match: "self_attn.*", layers: 1, source: dyn}
    """
    m = build(cli, write_recipe(tmp_path, llama, sources, "gptq", rules), tmp_path / "out")
    u = m["units"]
    assert u["model.layers.0.self_attn.qkv_proj"]["params"] == {"activation": "static", "block": None,
                                                                 "layout": "native", "strategy": "tensor"}
    assert u["model.layers.0.mlp.gate_up_proj"]["params"] == {"activation": "dynamic", "layout": "native"}
    assert u["model.layers.1.self_attn.qkv_proj"]["params"]["strategy"] == "channel"
    assert u["model.layers.1.self_attn.qkv_proj"]["params"]["activation"] == "dynamic"
    check_faithful(tmp_path / "out", m, llama, sources, "llama")


def test_gptq_v2_is_rewritten_to_v1_exactly(llama, cli, tmp_path):
    recipe = write_recipe(tmp_path, llama, {"v2": "gptq-v2", "fp8": "ct-fp8-static"}, "v2",
                          '- {match: "self_attn.*", layers: 0, source: fp8}')
    m = build(cli, recipe, tmp_path / "out")
    ck = Checkpoint.open(tmp_path / "out", "out")
    src = open_source("v2", llama["gptq-v2"], "llama")
    assert src.modules["model.layers.1.mlp.down_proj"].scheme.params["checkpoint_format"] == "gptq_v2"
    n = 0
    for name, mod in m["modules"].items():
        if mod["format"] != "gptq":
            continue
        assert mod["params"]["checkpoint_format"] == "gptq"
        assert mod["tensors"]["qzeros"]["rewrite"] == "gptq_v2_to_v1_qzeros"
        s = src.modules[name]
        assert torch.equal(dequantize_from_manifest(ck, mod), dequantize(s.scheme, s.tensors, *mod["shape"]))
        n += 1
    assert n >= 7


def test_copying_needs_no_torch(llama, tmp_path):
    """Build and verify copy bytes, rewrite GPTQ v2 zero points and compare AWQ's F16 norms with the base on numpy:
    torch's import is a second of every build (1.4 → 0.35 s for a GPTQ v2 Llama here). Only a repack (asymmetric
    GPTQ → WNA16) and the numeric checks need it."""
    sources = {"fp8": "ct-fp8-static", "int8": "ct-w8a8", "v2": "gptq-v2", "awq": "awq", "fp8blk": "native-fp8-block"}
    recipe = write_recipe(tmp_path, llama, sources, "v2", DENSE_RULES.replace("gptq", "v2"))
    out = tmp_path / "out"
    for argv in (["build", recipe, "-o", out], ["verify", out]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mpconvert.cli.main", *map(str, argv)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "| mpconvert.rules" in r.stderr  # (-X importtime lists every module imported)
        assert not [line for line in r.stderr.splitlines() if line.endswith("| torch")], argv[0]
    m = json.loads((out / MANIFEST).read_text())
    assert "gptq_v2_to_v1_qzeros" in m["tensors"]["rewrite"].values()  # the rewrite ran
    assert m["modules"]["model.layers.1.input_layernorm"]["source"] == "awq"  # the norms were compared


def test_moe_mixed_three_formats(moe, cli, tmp_path):
    sources = {"fp8": "ct-fp8-block", "nfp8": "native-fp8-block", "int8": "ct-w8a8", "gptq": "gptq"}
    rules = """
    - {match: "mlp.experts.*", layers: 0, source: fp8}
    - {match: "self_attn.*", layers: 0, source: int8}
    - {match: "self_attn.*", layers: 1, source: nfp8}
    """
    recipe = write_recipe(tmp_path, moe, sources, "gptq", rules)
    m = build(cli, recipe, tmp_path / "out")
    units = m["units"]
    assert units["model.layers.0.mlp.experts"]["format"] == "fp8"
    assert len(units["model.layers.0.mlp.experts"]["members"]) == 8 * 3
    assert units["model.layers.1.mlp.experts"]["format"] == "gptq"
    assert units["model.layers.0.self_attn.qkv_proj"]["format"] == "int8"
    assert units["model.layers.1.self_attn.qkv_proj"]["params"]["layout"] == "native"
    assert m["modules"]["model.layers.0.mlp.gate"]["kind"] == "router"
    worst = check_faithful(tmp_path / "out", m, moe, sources, "qwen3_moe")
    print("worst error / RTN error, moe:", worst)
    assert set(worst) >= {"fp8", "int8", "gptq"}


def test_memory_stays_bounded_by_a_chunk(llama, tmp_path):
    """The writer streams: a tensor larger than the copy chunk is never held whole (chunk count is observable)."""
    from mpconvert import safetensors_io as sio

    t = open_source("base", llama["base"], "llama").modules["lm_head"].tensors["weight"]
    chunks = list(sio.iter_bytes(t, chunk=64 * 1024))
    assert len(chunks) == -(-t.nbytes // (64 * 1024)) and max(len(c) for c in chunks) == 64 * 1024
    assert b"".join(chunks) == sio.read_bytes(t)


def test_scheme_detection_reports_each_format(llama):
    got = {k: open_source(k, p, "llama").describe() for k, p in llama.items()}
    assert got["gptq"].startswith("gptq [gptq int4 g128]")
    assert got["awq"].startswith("awq [awq int4 g128]")
    assert "fp8 block 128x128 act=dynamic (native)" in got["native-fp8-block"]
    assert "fp8 tensor act=static (ct)" in got["ct-fp8-static"]
    assert "int8 w8a8" in got["ct-w8a8"]
    assert got["native-w8a8"].startswith("w8a8_int8 [int8 w8a8 per-channel act=dynamic (native)]")
    assert "fp8 tensor act=static (native)" in got["native-fp8-tensor"]
    assert "fp8 channel act=dynamic (ct)" in got["ct-fp8-dynamic"]
    assert Scheme.of("gptq", bits=4) == Scheme.of("gptq", bits=4)


def test_mixtral_expert_names_are_mapped(cli, tmp_path):
    """Quantizers under transformers 5 write Mixtral experts as `…experts.N.gate_proj` (llm-compressor under
    block_sparse_moe, gptqmodel under mlp); SGLang wants `block_sparse_moe.experts.N.w1/w3/w2`."""
    from fixtures.factory import fixture

    from conftest import MIXTRAL_KINDS

    fx = {k: fixture("mixtral", k) for k in MIXTRAL_KINDS}
    recipe = write_recipe(tmp_path, fx, {"fp8": "ct-fp8-block", "gptq": "gptq"}, "gptq",
                          '- {match: "*", layers: 0, source: fp8}')
    m = build(cli, recipe, tmp_path / "out")
    ck = Checkpoint.open(tmp_path / "out", "out")
    names = set(ck.tensors)
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight_scale" in names
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in names
    assert not [n for n in names if ".mlp." in n or "gate_proj" in n or "down_proj" in n]
    assert m["units"]["model.layers.0.block_sparse_moe.experts"]["format"] == "fp8"
    assert m["units"]["model.layers.1.block_sparse_moe.experts"]["format"] == "gptq"
    assert m["modules"]["model.layers.1.block_sparse_moe.gate"]["kind"] == "router"
    check_faithful(tmp_path / "out", m, fx, {"fp8": "ct-fp8-block", "gptq": "gptq"}, "mixtral")


def test_the_demo_runs(cli, llama, tmp_path):
    """`make demo`'s command: the built-in recipe over the cached fixtures, built and inspected."""
    r = cli("demo", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "layout: mpconvert" in r.output and (tmp_path / "demo" / "mixed" / "mpconvert_manifest.json").is_file()


def test_the_demo_says_where_its_cache_cannot_be(cli, tmp_path, monkeypatch):
    """MPCONVERT_CACHE naming a file was an internal error (NotADirectoryError); an empty one made a relative cache
    that the producers, running in another directory, could not rename into (FileNotFoundError). One line for the
    first; the second means unset, and a relative one is taken from the current directory."""
    from helpers import refused
    from fixtures.factory import cache_root

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MPCONVERT_CACHE", str(tmp_path / "a-file"))
    refused(cli("demo", tmp_path / "demo"), f"{tmp_path / 'a-file' / 'fixtures'}: cannot keep fixtures there (Not a "
                                            f"directory); set MPCONVERT_CACHE to a writable directory")
    monkeypatch.setenv("MPCONVERT_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "mpconvert" / "fixtures"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPCONVERT_CACHE", "rel")
    assert cache_root() == tmp_path / "rel" / "fixtures"


def test_make_fixtures_drops_superseded_versions_from_the_cache(tmp_path, monkeypatch):
    """Each change to a producer script gives its fixtures a new key; the old versions stayed in a CI machine's cache
    for ever. `make fixtures` removes the other versions of what it made and dead producers' temporary directories —
    nothing else: a live producer's, other fixtures' (the GPU runs' DeepSeek sizes), files that are not entries."""
    from fixtures.factory import cache_root, prune_superseded

    monkeypatch.setenv("MPCONVERT_CACHE", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"kept": ["llama-gptq-" + "1" * 16, "llama-ct-fp8-static-" + "2" * 16],
             "gone": ["llama-gptq-" + "0" * 16, "llama-ct-fp8-static-" + "a" * 16,
                      f"llama-gptq-{'1' * 16}.tmp{dead.pid}"],
             "left": [f"llama-gptq-{'1' * 16}.tmp{os.getpid()}", "llama-ct-fp8-" + "3" * 16,
                      "deepseek-mla-base-" + "4" * 16, "llama-gptq-notakey", "notes"]}
    for n in (n for group in names.values() for n in group):
        (cache_root() / n).mkdir(parents=True)
        (cache_root() / n / "config.json").write_text("{}")
    removed = prune_superseded([cache_root() / n for n in names["kept"]])
    assert sorted(p.name for p in removed) == sorted(names["gone"])
    assert sorted(p.name for p in cache_root().iterdir()) == sorted(names["kept"] + names["left"])


def test_the_output_gets_a_tokenizer_or_a_warning_and_serve_says_why_it_cannot_start(llama, cli, tmp_path):
    """The side files came from the base only: a base with no tokenizer gave an output with none, verify said OK,
    and SGLang's server failed as it started ("Couldn't instantiate the backend tokenizer"). Now the files the base
    lacks come from the default source, else the first source by label that has a tokenizer (said in a note); with
    none anywhere build warns and serve refuses unless told where the tokenizer is."""
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    from helpers import refused, without_tokenizer

    fx = {**llama, "base": without_tokenizer(llama["base"], tmp_path / "base")}
    fx["gptq-bare"] = without_tokenizer(llama["gptq"], tmp_path / "gptq-bare")
    eval_text = tmp_path / "text.txt"
    eval_text.write_text(Path("/usr/share/common-licenses/GPL-3").read_text()[:20000])
    cases = {"default": ({"fp8": "ct-fp8-static", "gptq": "gptq"}, "gptq"),  # (sources, the label taken from)
             "next by label": ({"a": "ct-fp8-static", "gptq": "gptq-bare"}, "a"),
             "none": ({"gptq": "gptq-bare"}, None)}
    for case, (sources, label) in cases.items():
        d = tmp_path / case
        d.mkdir()
        rules = f'- {{match: "self_attn.*", layers: 0, source: {next(iter(sources))}}}'
        recipe = write_recipe(d, fx, sources, "gptq", rules)
        r = cli("build", recipe, "-o", d / "out")
        assert r.exit_code == 0, r.output
        text = " ".join(r.output.split())
        files = json.loads((d / "out" / MANIFEST).read_text())["files"]
        if label:
            assert (f"note: the base has no tokenizer; tokenizer.json, tokenizer_config.json taken from source "
                    f"{label!r} ({fx[sources[label]]})") in text, text
            for f in ("tokenizer.json", "tokenizer_config.json"):
                assert (d / "out" / f).read_bytes() == (fx[sources[label]] / f).read_bytes()
                assert files[f] == hashlib.sha256((d / "out" / f).read_bytes()).hexdigest()
            assert get_tokenizer(str(d / "out")).encode("hello world")  # SGLang's own loader takes it
            assert cli("serve", d / "out", "--print-command").exit_code == 0
            # verify --text tokenizes with the directory's tokenizer, as served (it loaded the base's: a traceback)
            r = cli("verify", d / "out", "--numeric", "--base", fx["base"], "--text", eval_text, "--json")
            assert r.exit_code == 0 and json.loads(r.stdout)["numeric"]["text"]["tokens"] > 1000, r.output
        else:
            assert ("warning: neither the base nor any source has a tokenizer (tokenizer.json, tokenizer.model, "
                    "vocab.json), and SGLang's server cannot start without one") in text, text
            assert not any(f.startswith("tokenizer") for f in files)
            refused(cli("serve", d / "out", "--print-command"), f"{d / 'out'} has no tokenizer (tokenizer.json, "
                    f"tokenizer.model, vocab.json), and SGLang's server cannot start without one: pass "
                    f"`-- --tokenizer-path DIR`")
            for extra in (["--tokenizer-path", str(llama["base"])], ["--skip-tokenizer-init"]):
                assert cli("serve", d / "out", "--print-command", "--", *extra).exit_code == 0
            refused(cli("verify", d / "out", "--numeric", "--base", fx["base"], "--text", eval_text),
                    f"--text: nothing to tokenize the text with — no tokenizer (tokenizer.json, tokenizer.model, "
                    f"vocab.json) in {d / 'out'} or {fx['base']}; put the model's tokenizer files in the base")
        assert cli("verify", d / "out").exit_code == 0
        gen = "generation_config.json"  # the base's, as before
        assert gen in files and (d / "out" / gen).read_bytes() == (fx["base"] / gen).read_bytes()


def test_the_remote_code_a_config_names_goes_with_it(llama, cli, tmp_path):
    """A config whose auto_map names the model's own code (DeepSeek-V3's names configuration_deepseek.py) is read with
    that code under --trust-remote-code, which SGLang's DeepSeek-V3 launch commands pass: the output lacked the file
    and SGLang's get_config failed ("does not appear to have a file named configuration_mymodel.py"). Build copies
    the files auto_map names, verify checks them, and --force replaces them as build's own (nothing else)."""
    import shutil

    from sglang.srt.utils.hf_transformers_utils import get_config

    from helpers import refused

    base = tmp_path / "base"
    shutil.copytree(llama["base"], base)
    code = "from transformers import LlamaConfig\n\n\nclass MyLlamaConfig(LlamaConfig):\n    model_type = 'llama'\n"
    (base / "configuration_mymodel.py").write_text(code)
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_mymodel.MyLlamaConfig",  # copied
                       "AutoModel": "modeling_absent.MyModel",  # named but not there: nothing to copy
                       "AutoModelForCausalLM": "other/repo--modeling_x.MyModel"}  # another repository's
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    recipe = write_recipe(tmp_path, {**llama, "base": base}, {"gptq": "gptq"}, "gptq")
    out = tmp_path / "out"
    assert cli("build", recipe, "-o", out).exit_code == 0
    assert (out / "configuration_mymodel.py").read_text() == code
    assert sorted(p.name for p in out.glob("*.py")) == ["configuration_mymodel.py"]
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert files["configuration_mymodel.py"] == hashlib.sha256(code.encode()).hexdigest()
    assert type(get_config(str(out), trust_remote_code=True)).__name__ == "MyLlamaConfig"
    assert cli("verify", out).exit_code == 0
    (out / "configuration_mymodel.py").write_text(code + "# edited\n")
    assert cli("verify", out).exit_code == 1
    assert cli("build", recipe, "-o", out, "--force").exit_code == 0
    (out / "mine.py").write_text("")
    refused(cli("build", recipe, "-o", out, "--force"), "it holds mine.py, which build does not write")


def test_a_borrowed_tokenizer_brings_its_code_and_not_the_sources_model_code(llama, cli, tmp_path):
    """Where the base has no tokenizer, a source's tokenizer comes with the code its tokenizer_config.json names (a
    custom tokenizer class); the code the source's config.json names does not (the output's config is the base's:
    --force then refused to replace the output, a file its config did not name)."""
    import shutil

    from helpers import without_tokenizer

    base = without_tokenizer(llama["base"], tmp_path / "base")
    src = tmp_path / "src"
    shutil.copytree(llama["gptq"], src)
    for name, key in (("tokenization_my.py", "tokenizer_config.json"), ("configuration_src.py", "config.json")):
        (src / name).write_text("# code\n")
        cfg = json.loads((src / key).read_text())
        cfg["auto_map"] = {"AutoTokenizer": ["tokenization_my.MyTokenizer", None]} if key.startswith("tok") else \
            {"AutoConfig": "configuration_src.SrcConfig"}
        (src / key).write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path, {**llama, "base": base, "src": src}, {"gptq": "src"}, "gptq")
    out = tmp_path / "out"
    assert cli("build", recipe, "-o", out).exit_code == 0
    assert sorted(p.name for p in out.glob("*.py")) == ["tokenization_my.py"]
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert cli("verify", out).exit_code == 0
    r = cli("build", recipe, "-o", out, "--force")
    assert r.exit_code == 0, r.output


TIKTOKEN_CODE = '''from transformers import PreTrainedTokenizer


class WordsTokenizer(PreTrainedTokenizer):
    """A remote-code tokenizer that reads its vocabulary from a file of its own naming, as Kimi-K2's reads
    tiktoken.model."""
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        self.words = open(vocab_file).read().split()
        self.ids = {w: i for i, w in enumerate(self.words)}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.words)

    def get_vocab(self):
        return dict(self.ids)

    def _tokenize(self, text):
        return text.split()

    def _convert_token_to_id(self, token):
        return self.ids.get(token, 0)

    def _convert_id_to_token(self, index):
        return self.words[index]
'''


def test_a_vocabulary_of_its_own_naming_goes_with_the_tokenizer(llama, cli, tmp_path):
    """A tokenizer whose remote code reads its vocabulary under a name of its own (Kimi-K2: tokenization_kimi.py reads
    tiktoken.model; Qwen-1: qwen.tiktoken). Build copied the code auto_map names but not the vocabulary, so the
    output's tokenizer could not load (and build thought the base had no tokenizer at all). It goes with the
    tokenizer now, verify checks it, and transformers loads the output's tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    from helpers import without_tokenizer

    base = without_tokenizer(llama["base"], tmp_path / "base")
    words = "<unk> <s> </s> " + " ".join(f"w{i}" for i in range(1021))
    (base / "tiktoken.model").write_text(words)
    (base / "tokenization_words.py").write_text(TIKTOKEN_CODE)
    (base / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_words.WordsTokenizer", None]},
        "tokenizer_class": "WordsTokenizer", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))
    out = tmp_path / "out"
    r = cli("build", write_recipe(tmp_path, {**llama, "base": base}, {"gptq": "gptq"}, "gptq"), "-o", out)
    assert r.exit_code == 0, r.output
    assert "tokenizer" not in r.output.split("built")[0]  # no note or warning about a missing tokenizer
    assert (out / "tiktoken.model").read_text() == words
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tok("w5 w6 w7", add_special_tokens=False).input_ids == [8, 9, 10]
    assert cli("verify", out).exit_code == 0
    (out / "tiktoken.model").write_text(words + " w1021")
    r = cli("verify", out, "--json")
    assert r.exit_code == 1 and "tiktoken.model" in r.output
    shutil.rmtree(out)
