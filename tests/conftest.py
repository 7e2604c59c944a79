"""Shared test fixtures: real quantizer outputs (cached by content hash, see fixtures/factory.py) and a CLI runner."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's fixture factory (fixtures/)
from fixtures.factory import (COHERE, GEMMA3, GLM4MOE, MLP_BIAS, OLMO2, QWEN2, QWEN3, SANDWICH,  # noqa: E402
                              SCRIPTS, STABLELM, deepseek_mla, fixture, smollm2)

LLAMA_KINDS = ("base", "ct-fp8-static", "ct-fp8-dynamic", "ct-fp8-block", "native-fp8-block", "native-fp8-tensor",
               "ct-w8a8", "native-w8a8", "ct-w8a8-smooth", "gptq", "gptq-v2", "awq", "ct-w4a16", "ct-w4a16-asym",
               "ct-w8a16-channel", "ct-gptq-asym-weight", "gptq-asym", "gptq-asym-v2", "gptq-asym-v2-desc", "gptq-desc",
               "autoawq")
MOE_KINDS = ("base", "ct-fp8-block", "native-fp8-block", "ct-w8a8", "gptq", "awq", "ct-w4a16", "ct-w4a16-asym",
             "gptq-asym")
MIXTRAL_KINDS = ("base", "ct-fp8-block", "gptq")
QWEN2MOE_KINDS = ("base", "ct-fp8-block", "ct-w8a8", "gptq")  # shared expert + shared_expert_gate, qkv bias
DEEPSEEK_KINDS = ("base", "ct-fp8-block", "ct-w8a8", "gptq")  # DeepSeek-V2: MLA, shared experts
# the real 135M model (fixtures/smollm2.py)
SMOLLM2_KINDS = ("base", "fp8-block", "fp8-dynamic", "w8a8", "gptq-g64", "ct-gptq-w4a16-g64", "ct-w4a16-asym-g64")
TAUGHT_MOE_KINDS = ("base", "ct-w8a8", "gptq")  # the trained Qwen3-MoE (its router has favourites): plan per expert
COHERE_KINDS = ("base", "ct-w8a8-smooth", "ct-fp8-dynamic")  # parallel block: SmoothQuant folds attention + MLP at once
SANDWICH_KINDS = ("base", "autoawq")  # Gemma 2: AutoAWQ folds gate/up into pre_feedforward_layernorm
DENSE_QWEN_KINDS = ("base", "ct-fp8-dynamic", "ct-w8a8", "ct-w8a8-smooth", "gptq", "awq")  # qwen2.py, qwen3.py
GLM4MOE_KINDS = ("base", "ct-fp8-block", "ct-w8a8")  # GLM-4.5 (gptqmodel 7.6 cannot quantize its router output)
# Gemma 3 (text): llm-compressor only (gptqmodel 7.6 and AutoAWQ cannot load it under their transformers)
GEMMA3_KINDS = ("base", "ct-fp8-dynamic", "ct-w8a8", "ct-w8a8-smooth", "ct-w4a16")
OLMO2_KINDS = ("base", "ct-fp8-dynamic", "ct-w8a8", "ct-w4a16", "gptq", "awq")  # OLMo 2: a post-norm block
STABLELM_KINDS = ("base", "ct-fp8-dynamic", "gptq")  # StableLM 2: SGLang builds its attention unquantized
MLP_BIAS_KINDS = ("base", "ct-fp8-dynamic")  # a Llama with mlp_bias: SGLang's Llama has no MLP biases
# Each architecture script beside producers.py (fixtures/factory.deepseek_mla) → the kinds made of it: what the
# fixtures below and `make fixtures` make
SCRIPT_KINDS = {COHERE: COHERE_KINDS, SANDWICH: SANDWICH_KINDS, QWEN2: DENSE_QWEN_KINDS, QWEN3: DENSE_QWEN_KINDS,
                GLM4MOE: GLM4MOE_KINDS, GEMMA3: GEMMA3_KINDS, OLMO2: OLMO2_KINDS, STABLELM: STABLELM_KINDS,
                MLP_BIAS: MLP_BIAS_KINDS}


def made_by(script: Path) -> dict[str, Path]:
    """Every kind SCRIPT_KINDS names for an architecture script, made (or found cached)."""
    return {k: deepseek_mla(k, script=script) for k in SCRIPT_KINDS[script]}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request) -> Path:
    """A directory for one test module's shared outputs (built checkpoints, generated jobs), removed when the module
    ends. Kept to the end of the session (as tmp_path_factory keeps them) they added up to gigabytes beside the
    passing tests' directories, and a CI machine's disk ran out (pyproject.toml keeps only failed tests' tmp_path)."""
    d = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def llama() -> dict[str, Path]:
    return {k: fixture("llama", k) for k in LLAMA_KINDS}


@pytest.fixture(scope="session")
def moe() -> dict[str, Path]:
    return {k: fixture("qwen3moe", k) for k in MOE_KINDS}


@pytest.fixture(scope="session")
def qwen2moe() -> dict[str, Path]:
    return {k: fixture("qwen2moe", k) for k in QWEN2MOE_KINDS}


@pytest.fixture(scope="session")
def deepseek() -> dict[str, Path]:
    return {k: fixture("deepseek", k) for k in DEEPSEEK_KINDS}


@pytest.fixture(scope="session")
def real() -> dict[str, Path]:
    return {k: smollm2(k) for k in SMOLLM2_KINDS}


@pytest.fixture(scope="session")
def taught_moe() -> dict[str, Path]:
    return {k: fixture("qwen3moe-taught", k) for k in TAUGHT_MOE_KINDS}


@pytest.fixture(scope="session")
def cohere() -> dict[str, Path]:
    return made_by(COHERE)


@pytest.fixture(scope="session")
def sandwich() -> dict[str, Path]:
    return made_by(SANDWICH)


@pytest.fixture(scope="session")
def gemma3() -> dict[str, Path]:
    return made_by(GEMMA3)


@pytest.fixture(scope="session")
def olmo2() -> dict[str, Path]:
    return made_by(OLMO2)


@pytest.fixture(scope="session")
def stablelm() -> dict[str, Path]:
    return made_by(STABLELM)


@pytest.fixture(scope="session")
def mlp_bias() -> dict[str, Path]:
    return made_by(MLP_BIAS)


@pytest.fixture(scope="session")
def glm4moe() -> dict[str, Path]:
    return made_by(GLM4MOE)


@pytest.fixture(scope="session", params=["qwen2", "qwen3"])
def dense_qwen(request) -> dict[str, Path]:
    """The dense Qwen models (Qwen2: q/k/v bias; Qwen3: q_norm/k_norm), both with a tied head."""
    return made_by(SCRIPTS[request.param])


@pytest.fixture
def cli():
    from mpconvert.cli.main import app

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run




@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """On a failed run, after the short summary, the free disk where the tests write: CI shows the end of the output
    only, and a full disk (most likely) made every later test error while creating its tmp_path."""
    yield
    if exitstatus == pytest.ExitCode.TESTS_FAILED:
        base = config._tmp_path_factory.getbasetemp()
        if base.is_dir():
            terminalreporter.write_line(f"disk: {shutil.disk_usage(base).free / 2**30:.2f} GiB free in {base}")
        else:  # removed under the run (the other way every later test errors creating its tmp_path)
            terminalreporter.write_line(f"disk: the tests' temporary directory {base} is gone")
