# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come from the same build (the Qwen-VL processors need torchvision);
# these pins exist on PyPI and on the CPU dev machines. Override TORCH_PINS for another CUDA build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test bench synthpedes-vl clip-synthpedes clean

$(BIN)/.installed: pyproject.toml
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

bench: venv
	$(BIN)/python -m bench

# rebuild the shipped tiny CLIP retriever from scratch (~25 min on 2 CPU cores; see its model card)
clip-synthpedes: venv
	PY=$(BIN)/python bash demo_models/clip-synthpedes/reproduce.sh $(or $(OUT),/tmp/clip_synthpedes)

# rebuild the shipped SynthPEDES-VL from scratch (~100 min on one CPU thread; see its model card)
synthpedes-vl: venv
	PY=$(BIN)/python bash demo_models/synthpedes-vl/reproduce.sh $(or $(OUT),/tmp/synthpedes_vl)

clean:
	rm -rf $(VENV) build *.egg-info
