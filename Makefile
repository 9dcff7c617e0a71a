# The two commands: `make demo` and `make test`. Both run the same idempotent set-up first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
CARGO ?= cargo
SAE := target/release/sae
# Where `make demo` keeps its dataset, SAE, features and browser; a rerun reuses what is finished.
DEMO_DIR ?= runs/demo
WITH_ENV := source scripts/env.sh &&

.PHONY: setup setup-test build demo test bench clean

## Install libtorch (unless LIBTORCH is set), the model and the corpus; skips what is there.
setup:
	bash scripts/setup.sh

## set-up plus the Python packages the reference tests and benchmarks use.
setup-test:
	bash scripts/setup.sh --test

## Build target/release/sae (runs without any environment: it carries an rpath to libtorch).
build: setup
	$(WITH_ENV) $(CARGO) build --release --bin sae

## The main job on the built-in defaults: `sae run` captures 400k tokens of English fortunes at
## blocks.15.hook_resid_post, trains a TopK SAE (8x, k = 32), evaluates it, builds its features and
## writes the feature browser. A rerun reuses (or resumes) every stage.
demo: build
	@echo "== sae generate (greedy) =="
	$(SAE) generate --prompt "The capital of France is" --max-new-tokens 16
	$(SAE) run --dir $(DEMO_DIR)

## The whole suite, in the release profile so the workspace compiles once.
test: setup-test
	$(WITH_ENV) $(CARGO) test --release --workspace

## Side-by-side benchmarks; results go into BENCHMARKS.md by hand, with the date.
bench: setup-test build
	$(WITH_ENV) bash scripts/bench.sh

clean:
	$(CARGO) clean
