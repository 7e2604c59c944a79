# mpconvert — set-up, demo, tests, benchmarks. Everything the project needs is installed from these files.
PY      ?= python3
VENV    := .venv
FVENV   := .venv-fixtures
V23     := .venv-sglang23
AVENV   := .venv-autoawq
PIP     := $(VENV)/bin/pip
export MPCONVERT_CACHE ?= $(HOME)/.cache/mpconvert
export TMPDIR ?= /tmp

.PHONY: setup demo test fixtures bench clean

setup: $(VENV)/.done $(FVENV)/.done $(V23)/.done $(AVENV)/.done  ## the tool (+ SGLang 0.5.17), producers, SGLang 0.5.23

# The tool's venv. torch is pinned and installed first (from local disk here), so nothing resolves another torch;
# SGLang comes --no-deps plus the light packages its imports need (DESIGN.md §6).
$(VENV)/.done: pyproject.toml requirements/runtime.txt requirements/sglang-imports.txt requirements/sglang-nodeps.txt requirements/lock-main.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c requirements/lock-main.txt -r requirements/runtime.txt -r requirements/sglang-imports.txt
	$(PIP) install -q --no-deps -r requirements/sglang-nodeps.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# The producers' venv (llm-compressor, gptqmodel need transformers ≥5.15; SGLang 0.5.17 needs <5.13). It reuses
# the tool venv's torch through a .pth file instead of installing a second 5 GB torch.
# A venv layered over the tool venv's site-packages (.pth: its torch), with requirements/$(2).txt pinned by
# requirements/lock-$(2).txt and requirements/$(2)-nodeps.txt installed --no-deps.
define layered_venv
	$(PY) -m venv $(1)
	$(VENV)/bin/python -c "import site; print(site.getsitepackages()[0])" > \
	  "$$($(1)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_mpconvert_main_venv.pth"
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q -c requirements/lock-$(2).txt -r requirements/$(2).txt
	$(1)/bin/pip install -q --no-deps -r requirements/$(2)-nodeps.txt
	touch $(1)/.done
endef

$(FVENV)/.done: $(VENV)/.done requirements/fixtures.txt requirements/fixtures-nodeps.txt requirements/lock-fixtures.txt
	$(call layered_venv,$(FVENV),fixtures)

# AutoAWQ (archived, transformers 4.51): the legacy AWQ producer, for the fixture that proves its GEMM output reads
# like gptqmodel's. Layered over the tool venv's torch like the producers.
$(AVENV)/.done: $(VENV)/.done requirements/autoawq.txt requirements/autoawq-nodeps.txt requirements/lock-autoawq.txt
	$(call layered_venv,$(AVENV),autoawq)

# SGLang 0.5.23 for the CPU engine tests on the second supported version: layered on the tool's venv (site.addsitedir,
# so that its torch and the editable mpconvert are seen), with only what 0.5.23 needs differently on top.
$(V23)/.done: $(VENV)/.done requirements/sglang23.txt requirements/sglang23-nodeps.txt requirements/lock-sglang23.txt
	$(PY) -m venv $(V23)
	echo "import site; site.addsitedir('$$($(VENV)/bin/python -c "import site; print(site.getsitepackages()[0])")')" > \
	  "$$($(V23)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_mpconvert_main_venv.pth"
	$(V23)/bin/pip install -q -c requirements/lock-sglang23.txt -r requirements/sglang23.txt
	$(V23)/bin/pip install -q --no-deps -r requirements/sglang23-nodeps.txt
	touch $@

demo: setup  ## tiny real fixtures → mixed checkpoint → inspect
	$(VENV)/bin/mpconvert demo demo-out

fixtures: setup  ## make (or find cached) every test fixture; drop their superseded versions from the cache
	$(VENV)/bin/python -c "import sys; sys.path.insert(0, 'tests'); import conftest as c; \
	  from fixtures.factory import fixture, prune_superseded, smollm2; \
	  made = [fixture('llama', k) for k in c.LLAMA_KINDS] + [fixture('qwen3moe', k) for k in c.MOE_KINDS] \
	    + [fixture('mixtral', k) for k in c.MIXTRAL_KINDS] + [fixture('qwen2moe', k) for k in c.QWEN2MOE_KINDS] \
	    + [fixture('deepseek', k) for k in c.DEEPSEEK_KINDS] + [smollm2(k) for k in c.SMOLLM2_KINDS] \
	    + [fixture('qwen3moe-taught', k) for k in c.TAUGHT_MOE_KINDS] \
	    + [p for script in c.SCRIPT_KINDS for p in c.made_by(script).values()]; \
	  [print('removed an earlier version of a fixture:', p) for p in prune_superseded(made)]"

# The whole suite on SGLang 0.5.17, then every test that runs SGLang's classes again on 0.5.23.
test: setup fixtures
	$(VENV)/bin/pytest -q
	$(V23)/bin/python -m pytest -q tests/test_shim.py tests/test_mixed_experts.py tests/test_verify.py \
	  tests/test_mtp.py tests/test_block_layouts.py tests/test_dense_qwen.py -k "test_shim or test_mixed_experts \
	  or engine or nextn_draft or mixed_inside or served_from_one_fold or drops_layer_names or mix_serves \
	  or beside_another_mlp or gemma3 or post_norm"

# mergekit (the comparison in the build benchmark) in its own venv, layered on .venv's torch like the producers.
.venv-bench/.done: $(VENV)/.done requirements/bench.txt
	$(PY) -m venv .venv-bench
	$(VENV)/bin/python -c "import site; print(site.getsitepackages()[0])" > \
	  "$$(.venv-bench/bin/python -c 'import site; print(site.getsitepackages()[0])')/_mpconvert_main_venv.pth"
	.venv-bench/bin/pip install -q -r requirements/bench.txt
	touch $@

bench: setup .venv-bench/.done  ## build vs cp -r vs mergekit passthrough, peak RSS at N and 2N layers
	$(VENV)/bin/python bench/build_bench.py

clean:
	rm -rf $(VENV) $(FVENV) $(V23) $(AVENV) .venv-bench demo-out
