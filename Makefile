# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the pair that installs from this project's machines' local disk;
# the package itself works with torch >= 2.4 (see pyproject.toml). Override for other machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: train test install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

train: install
	$(VENV)/bin/mixer train

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
