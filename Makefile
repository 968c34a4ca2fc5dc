# The two set-up commands (README): `make run` and `make test`.
PY := .venv/bin/python
PORT ?= 8000

.PHONY: install run test lint

install:
	bash scripts/install.sh

run: install
	$(PY) -m proxy.cli serve --port $(PORT)

test: install
	.venv/bin/ruff check proxy adapters tests bench
	.venv/bin/mypy proxy adapters
	$(PY) -m pytest -q -ra

lint: install
	.venv/bin/ruff check proxy adapters tests bench
