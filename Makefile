# vmvault: the two commands a new user needs are `make demo` and `make test`.
# Both install what they need first (Debian packages when root, a Python venv).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
APT_PKGS := xfsprogs e2fsprogs util-linux openssl restic borgbackup

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-system.sh
	bash scripts/setup-system.sh $(APT_PKGS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Azurite (the Azure Storage emulator), pinned in package.json / package-lock.json, for the
# Blob endpoint's differential test (tests/test_blob_azurite.py). Without npm it is left
# out: the test then skips, except under CI=true, where it fails.
node_modules/.vmvault-installed: package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --no-audit --no-fund && touch $@; \
	else \
	  echo "vmvault: npm not found, so Azurite is not installed (tests/test_blob_azurite.py skips)" >&2; \
	fi

demo: setup
	$(BIN)/python -m vmvault.demo

test: setup node_modules/.vmvault-installed
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/pytest -ra --durations=15 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy

bench: setup
	$(BIN)/vmvault-bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
