# The two set-up commands of the README: `make serve` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install dev-tools serve test test-slow protos bench-datastore bench-serving

install:
	bash scripts/install.sh

# buf and the Node.js gRPC client of the tests (package-lock.json), where npm is installed.
dev-tools:
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: tests that need buf or the Node.js client are skipped"; fi

serve: install
	$(VENV)/bin/retroserve serve $(ARGS)

test: install dev-tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install dev-tools
	RETROSERVE_SLOW=1 $(PY) -m pytest -q $(PYTEST_ARGS)

protos:
	$(PY) scripts/generate_protos.py
