# StreamML — every workflow is a make target. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
BROKERS ?= 1
PORT ?= 9092
BOOTSTRAP ?= 127.0.0.1:$(PORT)
DEMO_PIPELINE ?= demo
DEMO_RATE ?= 200
DEMO_EVENTS ?= 1250
# Only the targets that talk to the local broker point at it; tests start their own broker.
KAFKA_ENV := STREAMML_BOOTSTRAP_SERVERS=$${STREAMML_BOOTSTRAP_SERVERS:-$(BOOTSTRAP)}

.DEFAULT_GOAL := help
.PHONY: help install kafka-jars kafka-up kafka-down kafka-logs kafka-status topics lint format codegen \
        test test-unit test-integration test-e2e demo down ci

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

demo: kafka-up ## Broker up, topics, produce the Phishing dataset, then show the topic
	$(KAFKA_ENV) streamml topics create --pipeline $(DEMO_PIPELINE)
	$(KAFKA_ENV) streamml produce river:Phishing --pipeline $(DEMO_PIPELINE) --rate $(DEMO_RATE) --limit $(DEMO_EVENTS)
	$(KAFKA_ENV) streamml tail streamml.$(DEMO_PIPELINE).raw --limit 5
	@echo "demo done: the local broker keeps running at $(BOOTSTRAP); 'make down' stops it"

down: kafka-down ## Stop everything `make demo` started

ci: ## Run exactly what CI runs
	.ci/run
