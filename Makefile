# The toolkit's commands. `make` alone lists them.
SHELL := /bin/bash
CARGO ?= cargo

.DEFAULT_GOAL := help

.PHONY: help tools test test-browser test-containers package lint fmt bench demo up chaos chaos-cluster fuzz

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# With both DATABASE_URL and NATS_URL set, the demo uses those servers and needs nothing installed.
DEMO_NEEDS := $(if $(and $(DATABASE_URL),$(NATS_URL)),,tools)

demo: $(DEMO_NEEDS) ## Build, start PostgreSQL, nats-server, the 3 services and 2 relays, run the saga, print what happened
	$(CARGO) build --locked -q -p demo-services -p demo-runner -p outbox-toolkit-relay --bins
	$(CARGO) run --locked -q -p demo-runner --bin demo -- run

up: $(DEMO_NEEDS) ## Start the demo stack on ports 3001-3003 and the operator console on 3000, in the foreground (ctrl-c stops it)
	$(CARGO) build --locked -q -p demo-services -p demo-runner -p outbox-toolkit-relay --bins
	$(CARGO) run --locked -q -p demo-runner --bin demo -- up

CHAOS_ARGS ?=

chaos: tools ## Kill the broker, relays, services and PostgreSQL mid-flow under load; check nothing is lost, doubled or reordered, in the tables and the stream (CHAOS_ARGS="--seed 7 --orders 1000 --rate 20 --keys 1500 --hot 1500 --source table|wal")
	$(CARGO) build --locked -q -p demo-services -p demo-runner -p outbox-toolkit-relay --bins
	$(CARGO) run --locked -q -p demo-runner --bin chaos -- $(CHAOS_ARGS)

chaos-cluster: tools ## The same on a 3-node JetStream cluster with an R3 stream: SIGKILL the stream leader, then a follower
	$(CARGO) build --locked -q -p demo-services -p demo-runner -p outbox-toolkit-relay --bins
	$(CARGO) run --locked -q -p demo-runner --bin chaos -- --cluster --dir target/chaos-cluster $(CHAOS_ARGS)

tools: ## Install what is missing: PostgreSQL (apt-get when root) and nats-server 2.15.1 into .tools/bin
	@tools/install.sh

test: tools ## Install what is missing, then run every test against real PostgreSQL and nats-server
	$(CARGO) test --workspace --locked --no-fail-fast

test-browser: tools ## Install chromium and chromium-driver when missing (root), then drive the console in a headless browser over a demo stack
	@tools/install-browser.sh
	$(CARGO) test --locked -p demo-runner --features browser --test browser

# The images test-containers runs: the local builds of tools/images.sh, or set these to images
# Docker can pull (TESTKIT_POSTGRES_IMAGE=postgres:18 TESTKIT_NATS_IMAGE=nats:2.15.1).
TESTKIT_POSTGRES_IMAGE ?= outbox-toolkit/postgres:15-bookworm
TESTKIT_NATS_IMAGE ?= outbox-toolkit/nats:2.15.1
# DATABASE_URL / NATS_URL would win over the backend: unset them here.
CONTAINERS := env -u DATABASE_URL -u NATS_URL TESTKIT_BACKEND=containers TESTKIT_POSTGRES_IMAGE=$(TESTKIT_POSTGRES_IMAGE) TESTKIT_NATS_IMAGE=$(TESTKIT_NATS_IMAGE)

test-containers: tools ## Install Docker when missing (root), start dockerd, build the local images once, run the test kit, a relay and an inbox suite on containers
	@tools/docker.sh
	@TESTKIT_POSTGRES_IMAGE=$(TESTKIT_POSTGRES_IMAGE) TESTKIT_NATS_IMAGE=$(TESTKIT_NATS_IMAGE) tools/images.sh
	$(CONTAINERS) $(CARGO) test --locked --no-fail-fast -p outbox-toolkit-testkit --features containers --lib --test containers --test postgres --test nats --test proxy
	$(CONTAINERS) $(CARGO) test --locked --no-fail-fast -p outbox-toolkit-relay --features testkit/containers --test drain
	$(CONTAINERS) $(CARGO) test --locked --no-fail-fast -p outbox-toolkit-inbox --features testkit/containers --test guarantees

LIBRARIES := envelope outbox migrations connect dlq relay inbox testkit

package: ## Package every library crate as the registry would (cargo package: builds each from its own tarball)
	$(CARGO) package --locked $(addprefix -p outbox-toolkit-,$(LIBRARIES))

SEEDS ?= 200

fuzz: tools ## Run the generative suites on SEEDS random seeds (default 200); a failure prints its seed to replay (RELAY_FUZZ_SEED=N, INBOX_FUZZ_SEED=N)
	RELAY_FUZZ_SEEDS=$(SEEDS) $(CARGO) test --locked -p outbox-toolkit-relay --test generative -- --nocapture
	INBOX_FUZZ_SEEDS=$(SEEDS) $(CARGO) test --locked -p outbox-toolkit-inbox --test generative -- --nocapture

lint: ## cargo fmt --check, cargo clippy --all-targets -- -D warnings, and the docs with -D warnings (broken links)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --locked

bench: tools ## Run the end-to-end scenarios (relay, producer, inbox), then the criterion micro-benchmarks (see BENCHMARKS.md)
	$(CARGO) run --release --locked -p bench -- relay-drain
	$(CARGO) run --release --locked -p bench -- relay-drain --source wal
	$(CARGO) run --release --locked -p bench -- relay-latency
	$(CARGO) run --release --locked -p bench -- relay-latency --source wal
	$(CARGO) run --release --locked -p bench -- producer-overhead
	$(CARGO) run --release --locked -p bench -- producer-overhead --enqueue with-commit
	$(CARGO) run --release --locked -p bench -- producer-overhead --storage wal --enqueue with-commit
	$(CARGO) run --release --locked -p bench -- relay-backlog
	$(CARGO) run --release --locked -p bench -- relay-backlog --source wal
	$(CARGO) run --release --locked -p bench -- inbox-consume --mode strict --events 20000
	$(CARGO) run --release --locked -p bench -- inbox-consume --mode batched --handler batch
	$(CARGO) run --release --locked -p bench -- inbox-consume --mode batched --handler per-message
	$(CARGO) run --release --locked -p bench -- console
	$(CARGO) bench --locked -p bench

fmt: ## Format the code
	$(CARGO) fmt --all
