# The two commands of the README: `make run` (the default recipe, real SmolLM2 weights) and
# `make test`. Both create the environment first (scripts/setup.sh).
VENV ?= .venv
RECIPE ?= recipes/smollm2-135m.yaml

.PHONY: setup run test

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/export-skip $(RECIPE)

test: setup
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -m "not gpu and (not slow or real_weights(ci=True))"
