# The two set-up commands (README): `make run` and `make test`.
PY := .venv/bin/python
PORT ?= 8000

.PHONY: install run test lint

install:
	bash scripts/install.sh

run: install
	$(PY) -m proxy.cli serve --port $(PORT)

test: install
	bash scripts/install-vllm.sh >/dev/null  # vLLM for the tests' remote, in its own venv (once, ~3 minutes)
	.venv/bin/ruff check proxy adapters tests bench
	.venv/bin/mypy proxy adapters bench
	$(PY) -m pytest -q -ra

lint: install
	.venv/bin/ruff check proxy adapters tests bench
