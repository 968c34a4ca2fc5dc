# The two set-up commands (README): `make run` and `make test`.
PY := .venv/bin/python
PORT ?= 8000

.PHONY: install run test test-fast lint docs

install:
	bash scripts/install.sh

run: install
	$(PY) -m proxy.cli serve --port $(PORT)

# Everything: lint, types, the import contracts, the docs site, then every test.
test: install lint docs
	bash scripts/install-vllm.sh >/dev/null  # vLLM for the tests' remote, in its own venv (once, ~3 minutes)
	bash scripts/install-services.sh  # redis-server and nginx from the distribution's packages (once), for the replica tests
	$(PY) -m pytest -q -ra --durations=15

# The inner loop: the same checks and the tests that need no packaged model, no server and no
# separate proxy process (about 3 minutes on 2 cores).
test-fast: install lint
	$(PY) -m pytest -q -ra --durations=10 -m "not slow and not llama_server and not vllm and not process"

lint: install
	.venv/bin/ruff check proxy adapters tests bench docs/hooks
	.venv/bin/mypy proxy adapters bench
	.venv/bin/lint-imports

# The docs site, built strictly into a temporary folder (a warning fails the build).
docs: install
	site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "$$site"; \
	rc=$$?; rm -rf "$$site"; exit $$rc
