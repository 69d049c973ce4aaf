# The two set-up commands of the README: `make serve` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install serve test test-slow protos bench-datastore bench-serving

install:
	bash scripts/install.sh

serve: install
	$(VENV)/bin/retroserve serve $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	RETROSERVE_SLOW=1 $(PY) -m pytest -q $(PYTEST_ARGS)

protos:
	$(PY) -m protos.generate
