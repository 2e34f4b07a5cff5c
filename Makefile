OUT ?= runs/digits
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

# README command 1: distil the embedded teacher into 3 students on a local embedded Ray
demo: setup
	.venv/bin/o2mkd-ray distill pipelines/digits.yaml --out $(OUT) $(DEMO_ARGS)

# README command 2 (.ci/run): the test suite
test: setup
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	.venv/bin/python benchmarks/bench_sampling.py
