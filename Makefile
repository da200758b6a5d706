# pagoda: one command to set up and test, one to try it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PAGODA := $(VENV)/bin/pagoda
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install model test generate chat serve clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PAGODA) pull smollm2
	$(PAGODA) pull gemma3-270m

test: model
	$(PY) -m pytest -q $(PYTEST_ARGS)

generate: model
	$(PAGODA) generate "The capital of France is" --raw --max-tokens 32 --stop '\n'

chat: model
	$(PAGODA) chat

clean:
	rm -rf $(VENV) .pytest_cache

serve: model
	$(PAGODA) serve $(SERVE_ARGS)
