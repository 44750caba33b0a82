# The toolkit's commands. `make` alone lists them.
SHELL := /bin/bash
CARGO ?= cargo

.DEFAULT_GOAL := help

.PHONY: help tools test lint fmt bench

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

tools: ## Install what is missing: PostgreSQL (apt-get when root) and nats-server 2.15.1 into .tools/bin
	@tools/install.sh

test: tools ## Install what is missing, then run every test against real PostgreSQL and nats-server
	$(CARGO) test --workspace --locked --no-fail-fast

lint: ## cargo fmt --check and cargo clippy --all-targets -- -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

bench: tools ## Run the end-to-end scenarios (relay, producer, inbox), then the criterion micro-benchmarks (see BENCHMARKS.md)
	$(CARGO) run --release --locked -p bench -- relay-drain
	$(CARGO) run --release --locked -p bench -- relay-latency
	$(CARGO) run --release --locked -p bench -- producer-overhead
	$(CARGO) run --release --locked -p bench -- relay-backlog
	$(CARGO) run --release --locked -p bench -- inbox-consume --mode strict --events 20000
	$(CARGO) run --release --locked -p bench -- inbox-consume --mode batched
	$(CARGO) bench --locked -p bench

fmt: ## Format the code
	$(CARGO) fmt --all
