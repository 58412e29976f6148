# StreamML — every workflow is a make target. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
BROKERS ?= 1
PORT ?= 9092
BOOTSTRAP ?= 127.0.0.1:$(PORT)
DEMO_PIPELINE ?= agrawal
DEMO_RATE ?= 200
DEMO_EVENTS ?= 50000
# `make demo`: how long `streamml top` watches, and where the Agrawal stream drifts from concept 0 to 4
# (by default halfway through the view; DEMO_RATE must then be a whole number).
DEMO_SECONDS ?= 120
DEMO_DRIFT_AT ?= $$(( $(DEMO_RATE) * $(DEMO_SECONDS) / 2 ))
DEMO_DRIFT_WIDTH ?= 1000
DEMO_SOURCE = drift:agrawal?position=$(DEMO_DRIFT_AT)&width=$(DEMO_DRIFT_WIDTH)&before=0&after=4&seed=42
DEMO_KEY_FILE := .local/demo-signing-key
DEMO_PRODUCER_PID := .local/producer.pid
# The services need a signing key: yours if STREAMML_SIGNING_KEY is set, else the local demo key.
DEMO_ENV = $(KAFKA_ENV) STREAMML_SIGNING_KEY="$${STREAMML_SIGNING_KEY:-$$(cat $(DEMO_KEY_FILE))}"
# Stops the demo producer, after checking the recorded pid still is one (pids get reused).
STOP_DEMO_PRODUCER = if [ -f $(DEMO_PRODUCER_PID) ]; then pid=$$(cat $(DEMO_PRODUCER_PID)); \
	if ps -p $$pid -o args= 2>/dev/null | grep -q 'streamml produce'; then kill $$pid; \
	for _ in $$(seq 50); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
	kill -9 $$pid 2>/dev/null; echo "stopped the producer (pid $$pid)"; fi; rm -f $(DEMO_PRODUCER_PID); fi
# Only the targets that talk to the local broker point at it; tests start their own broker.
KAFKA_ENV := STREAMML_BOOTSTRAP_SERVERS=$${STREAMML_BOOTSTRAP_SERVERS:-$(BOOTSTRAP)}

.DEFAULT_GOAL := help
.PHONY: help install kafka-jars kafka-up kafka-down kafka-logs kafka-status topics lint format codegen \
        test test-unit test-integration test-e2e demo down prometheus-check ci bench

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

install: ## Install StreamML and its dev tools (pip install -e '.[dev]')
	$(PYTHON) -m pip install -e '.[dev]'

kafka-jars: ## Fetch the Apache Kafka jars with Maven into .local/kafka-libs (once)
	$(PYTHON) -m streamml.localkafka jars

kafka-up: ## Start a local KRaft Kafka on 127.0.0.1 (BROKERS=3 for a 3-broker cluster)
	$(PYTHON) -m streamml.localkafka up --brokers $(BROKERS) --port $(PORT)

kafka-down: ## Stop the local Kafka
	$(PYTHON) -m streamml.localkafka down

kafka-logs: ## Show the last lines of the local Kafka's logs
	$(PYTHON) -m streamml.localkafka logs

kafka-status: ## Is the local Kafka running?
	$(PYTHON) -m streamml.localkafka status

topics: ## Create/verify all declared topics (and the demo pipeline's) on the broker
	$(KAFKA_ENV) streamml topics create --pipeline $(DEMO_PIPELINE)

lint: ## Check style, imports and types (changes nothing)
	ruff check .
	ruff format --check .
	mypy

format: ## Format the code and sort imports
	ruff check --fix .
	ruff format .

codegen: ## Regenerate streamml/records.py from schemas/*.avsc
	$(PYTHON) -m streamml.codegen

test: lint test-unit test-integration test-e2e ## Lint + unit + integration + e2e (starts and stops its own broker)

test-unit: ## Unit tests (no broker)
	$(PYTHON) -m pytest tests/unit -q

test-integration: ## Integration tests against a real Kafka broker started by the tests
	$(PYTHON) -m pytest tests/integration -q

test-e2e: ## End-to-end tests of whole services against a real broker
	@if ls tests/e2e/test_*.py >/dev/null 2>&1; then $(PYTHON) -m pytest tests/e2e -q; else echo "no e2e tests yet"; fi

demo: kafka-up ## Whole system live: broker, services, a drifting Agrawal stream and `streamml top`
	@mkdir -p .local/logs
	@if [ -z "$$STREAMML_SIGNING_KEY" ] && [ ! -s $(DEMO_KEY_FILE) ]; then \
		(umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_hex(32))' > $(DEMO_KEY_FILE)) && \
		echo "created a local demo signing key in $(DEMO_KEY_FILE) (never commit it)"; fi
	$(DEMO_ENV) streamml topics create --pipeline agrawal
	$(DEMO_ENV) $(PYTHON) -m streamml.stack up
	@# Debian's `prometheus` scraping the services just started (skipped with a note if not installed).
	$(PYTHON) -m streamml.promstack up --optional
	$(DEMO_ENV) streamml pipeline apply pipelines/agrawal.yaml
	@$(STOP_DEMO_PRODUCER)
	$(DEMO_ENV) setsid streamml produce "$(DEMO_SOURCE)" --pipeline agrawal --rate $(DEMO_RATE) \
		--limit $(DEMO_EVENTS) --no-progress > .local/logs/producer.log 2>&1 & echo $$! > $(DEMO_PRODUCER_PID)
	@echo "producing $(DEMO_EVENTS) events at $(DEMO_RATE)/s (pid $$(cat $(DEMO_PRODUCER_PID)), log .local/logs/producer.log)"
	@# One shell line, so the summary still prints when Ctrl-C ends the view (everything else keeps running).
	@$(DEMO_ENV) streamml top --duration $(DEMO_SECONDS); \
	echo; echo "Still running in the background (watch again: streamml top; stop it all: make down):"; \
	$(PYTHON) -m streamml.localkafka status | head -1 | sed 's/^/  kafka /'; \
	ps -o pid=,args= -p "$$(grep -o '"pid": [0-9]*' .local/stack.json | grep -o '[0-9]*$$' | paste -sd, -)" \
		| cut -c1-90 | sed 's/^ */  /'; \
	if url=$$($(PYTHON) -m streamml.promstack url); then echo "  prometheus $$url (alerts $$url/alerts)"; fi; \
	if kill -0 $$(cat $(DEMO_PRODUCER_PID)) 2>/dev/null; then \
		echo "  $$(cat $(DEMO_PRODUCER_PID)) producer (log .local/logs/producer.log)"; \
	else echo "  (the producer has finished: $$(tail -1 .local/logs/producer.log))"; fi

down: ## Stop everything `make demo` started: producer, Prometheus, services, local Kafka
	@$(STOP_DEMO_PRODUCER)
	$(PYTHON) -m streamml.promstack down
	$(PYTHON) -m streamml.stack down
	@$(MAKE) --no-print-directory kafka-down

bench: ## Benchmark (not a test): data path, latency, swaps, learner, closed loop; tables + a JSON last line (~4 min)
	$(PYTHON) -m bench

prometheus-check: ## Check the Prometheus configs and rules, run the alert unit tests, check the dashboards are generated
	cd deploy/prometheus && promtool check config prometheus.yml && promtool check config prometheus.local.yml
	promtool check rules deploy/prometheus/rules/*.yml
	promtool test rules deploy/prometheus/tests/*.yml
	$(PYTHON) deploy/grafana/generate.py --check

ci: ## Run exactly what CI runs
	.ci/run
