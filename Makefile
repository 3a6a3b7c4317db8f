# Quick start: `make demo` (main job) and `make test` (the test suite).
PY := .venv/bin/python

.PHONY: setup demo test lint
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m vllm_sink.demo

test: setup
	$(PY) -m pytest tests -q

lint: setup
	.venv/bin/ruff format --check vllm_sink tests benchmarks
	.venv/bin/ruff check vllm_sink tests benchmarks
