# The two commands: `make demo` and `make test`. Both run the same idempotent set-up first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
CARGO ?= cargo
SAE := target/release/sae
# Where `make demo` keeps its dataset; a rerun finds it finished (or resumes it) instead of redoing it.
DEMO_DATA ?= data/demo/fortunes-l15
# Where `make demo` puts its SAE; a rerun reports the finished SAE (or resumes it).
DEMO_SAE ?= runs/demo/topk-l4608-k32
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

## The main job on the built-in defaults.
demo: build
	@echo "== sae generate (greedy) =="
	$(SAE) generate --prompt "The capital of France is" --max-new-tokens 16
	@echo "== sae capture: 100k tokens of English fortunes at blocks.15.hook_resid_post =="
	$(SAE) capture --out $(DEMO_DATA) --max-tokens 100000 --hook blocks.15.hook_resid_post
	@echo "== sae dataset info =="
	$(SAE) dataset info $(DEMO_DATA)
	@echo "== sae train: a TopK SAE (8x, k = 32) on 3 passes over the dataset, then FVU, L0, dead % and the CE-loss score =="
	$(SAE) train --data $(DEMO_DATA) --out $(DEMO_SAE) --arch topk --latents 4608 --k 32 --batch-size 1024 --lr 5e-4 --max-tokens 300000

## The whole suite, in the release profile so the workspace compiles once.
test: setup-test
	$(WITH_ENV) $(CARGO) test --release --workspace

## Side-by-side benchmarks; results go into BENCHMARKS.md by hand, with the date.
bench: setup-test build
	$(WITH_ENV) bash scripts/bench.sh

clean:
	$(CARGO) clean
