# The two commands: `make demo` and `make test`. Both run the same idempotent set-up first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
CARGO ?= cargo
SAE := target/release/sae
# Where `make demo` keeps its dataset, SAE, features and browser; a rerun reuses what is finished.
DEMO_DIR ?= runs/demo
WITH_ENV := source scripts/env.sh &&

.PHONY: setup setup-test build demo lint test faults bench clean

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

## Formatting and lints: cargo fmt --check (rustfmt.toml) and clippy with warnings as errors.
## Clippy runs in the release profile, so it reuses the tests' build scripts (libtorch, c10d).
lint: setup-test
	$(WITH_ENV) $(CARGO) fmt --all --check
	$(WITH_ENV) $(CARGO) clippy --release --workspace --all-targets -- -D warnings

## The lint gate, then the whole suite, in the release profile so the workspace compiles once.
test: lint
	$(WITH_ENV) $(CARGO) test --release --workspace

## The fault campaign at full size (pipeline/tests/faults.rs; `make test` runs it with 2 faults per
## scenario): FAULT_KILLS faults per scenario at places drawn from FAULT_SEED, then one summary
## line per scenario. The figures go into RELIABILITY.md by hand, with the date.
FAULT_KILLS ?= 10
FAULT_SEED ?= 13
FAULT_SUMMARY := $(CURDIR)/target/faults-summary.txt
faults: setup-test
	rm -f $(FAULT_SUMMARY)
	status=0; $(WITH_ENV) SAE_FAULT_KILLS=$(FAULT_KILLS) SAE_FAULT_SEED=$(FAULT_SEED) SAE_FAULT_SUMMARY=$(FAULT_SUMMARY) \
	  $(CARGO) test --release -p pipeline --test faults -- --nocapture || status=$$?; \
	  echo "== fault campaign: $(FAULT_KILLS) faults per scenario, seed $(FAULT_SEED) =="; \
	  cat $(FAULT_SUMMARY) 2>/dev/null || echo "(no scenario finished)"; exit $$status

## Side-by-side benchmarks; results go into BENCHMARKS.md by hand, with the date.
bench: setup-test build
	$(WITH_ENV) bash scripts/bench.sh

clean:
	$(CARGO) clean
