OUT ?= runs/digits
PYTEST_ARGS ?=

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

# README command 1: distil the embedded teacher into 3 students on a local embedded Ray
demo: setup
	.venv/bin/o2mkd-ray distill pipelines/digits.yaml --out $(OUT)

# README command 2 (.ci/run): the test suite
test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	.venv/bin/python benchmarks/bench_sampling.py
