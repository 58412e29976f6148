# StreamML — every workflow is a make target. `make help` lists them.
SHELL := /bin/bash
# The machine's Python 3.11+: it only creates .venv; every target runs the venv's python and tools.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The venv holds exactly requirements.lock (pinned, hashed) plus StreamML itself (editable). The stamp's
# name carries a checksum of the lock and pyproject.toml, so a later run reinstalls only when they change.
VENV_STAMP := $(VENV)/.stamp-$(shell cat requirements.lock pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
# `make lock` runs pip-tools from its own small venv (git-ignored), pinned like everything else.
PIP_TOOLS_VERSION := 7.6.2
LOCK_TOOLS := .local/lock-tools
LOCK_FLAGS ?=
BROKERS ?= 1
PORT ?= 9092
# `make kafka-up SECURE=1`: TLS listeners, SCRAM logins for applications, mutual TLS for the operator, ACLs.
SECURE ?=
BOOTSTRAP ?= 127.0.0.1:$(PORT)
DEMO_PIPELINE ?= agrawal
DEMO_RATE ?= 200
DEMO_EVENTS ?= 50000
# `make demo`: how long `streamml top` watches, and where the Agrawal stream drifts from concept 0 to 4
# (by default halfway through the view; DEMO_RATE must then be a whole number).
DEMO_SECONDS ?= 120
# `make demo INSTANCES=2`: processes per service (N, or e.g. INSTANCES=learner=2,features=3).
INSTANCES ?= 1
DEMO_DRIFT_AT ?= $$(( $(DEMO_RATE) * $(DEMO_SECONDS) / 2 ))
DEMO_DRIFT_WIDTH ?= 1000
DEMO_SOURCE = drift:agrawal?position=$(DEMO_DRIFT_AT)&width=$(DEMO_DRIFT_WIDTH)&before=0&after=4&seed=42
DEMO_KEY_FILE := .local/demo-signing-key
DEMO_PRODUCER_PID := .local/producer.pid
# Model versions are signed with Ed25519: learner and trainer get the private key file, every service the
# public key (the stack gives each service only what its role needs). Yours if STREAMML_MODEL_VERIFY_KEYS
# is set, else a local demo pair. The monitor signs its own state with STREAMML_SIGNING_KEY (HMAC): yours,
# else a local demo key.
DEMO_MODEL_KEY := .local/demo-model-signing.pem
# `make demo SECURE=1`: the operator (mutual TLS, admin.env) applies the principals and ACLs; the CLI and the
# producer then run as the user streamml-cli, every service as its own user (passwords stay in files).
SECURE_ON = $(filter 1 true yes,$(SECURE))
KAFKA_HOME_DIR = $${STREAMML_KAFKA_HOME:-.local/kafka}
CLI_ENV_FILE := .local/demo-cli.env
USER_ENV = $(if $(SECURE_ON),env $$(cat $(CLI_ENV_FILE)),)
# The demo runs with a local Schema Registry (typed contracts, Confluent wire format) unless REGISTRY=0.
REGISTRY ?= 1
REGISTRY_ON = $(filter 1 true yes,$(REGISTRY))
REGISTRY_ENV = $(if $(REGISTRY_ON),STREAMML_SCHEMA_REGISTRY_URL="$${STREAMML_SCHEMA_REGISTRY_URL:-$$($(PY) -m streamml.localregistry url)}",)
DEMO_ENV = $(KAFKA_ENV) $(USER_ENV) $(REGISTRY_ENV) STREAMML_SIGNING_KEY="$${STREAMML_SIGNING_KEY:-$$(cat $(DEMO_KEY_FILE))}" \
	STREAMML_MODEL_SIGNING_KEY_FILE="$${STREAMML_MODEL_SIGNING_KEY_FILE:-$(DEMO_MODEL_KEY)}" \
	STREAMML_MODEL_VERIFY_KEYS="$${STREAMML_MODEL_VERIFY_KEYS:-$$($(BIN)/streamml keys show $(DEMO_MODEL_KEY) 2>/dev/null)}"
# Stops the demo producer, after checking the recorded pid still is one (pids get reused).
STOP_DEMO_PRODUCER = if [ -f $(DEMO_PRODUCER_PID) ]; then pid=$$(cat $(DEMO_PRODUCER_PID)); \
	if ps -p $$pid -o args= 2>/dev/null | grep -q 'streamml produce'; then kill $$pid; \
	for _ in $$(seq 50); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
	kill -9 $$pid 2>/dev/null; echo "stopped the producer (pid $$pid)"; fi; rm -f $(DEMO_PRODUCER_PID); fi
# Only the targets that talk to the local broker point at it; tests start their own broker.
KAFKA_ENV := STREAMML_BOOTSTRAP_SERVERS=$${STREAMML_BOOTSTRAP_SERVERS:-$(BOOTSTRAP)}
# A local broker needs Java: one clear line when it is missing (Maven's absence is reported by `kafka-jars`).
REQUIRE_JAVA = { command -v java >/dev/null 2>&1 || [ -x "$${JAVA_HOME:-/nonexistent}/bin/java" ]; } || \
	{ echo "error: Java 17+ is not installed (e.g. apt-get install openjdk-17-jre-headless)" >&2; exit 1; }

.DEFAULT_GOAL := help
.PHONY: help install lock quix-venv kafka-jars kafka-up kafka-down kafka-logs kafka-status topics lint format codegen \
        registry-dist registry-up registry-down \
        test test-unit test-integration test-e2e demo down prometheus-check ci bench fuzz chaos k8s-manifests

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

install: $(VENV_STAMP) ## Create .venv from requirements.lock (every target does this itself when needed)

$(VENV_STAMP):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found: install Python 3.11 (e.g. apt-get install python3 python3-venv)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: StreamML needs Python 3.11+, $(PYTHON) is $$($(PYTHON) -V 2>&1) (set PYTHON=python3.11)" >&2; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { echo "error: $(PYTHON) cannot create a venv: install its venv module (e.g. apt-get install python3-venv)" >&2; exit 1; }
	@if ! $(PY) -c '' 2>/dev/null; then rm -rf $(VENV) && echo "creating $(VENV) with $$($(PYTHON) -V 2>&1)" && $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.stamp-* && touch $@

lock: ## Regenerate requirements.lock (pinned + hashed, runtime + dev) from pyproject.toml; LOCK_FLAGS=--upgrade
	@if [ ! -f $(LOCK_TOOLS)/.pip-tools-$(PIP_TOOLS_VERSION) ]; then rm -rf $(LOCK_TOOLS) && \
		$(PYTHON) -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/pip install -q --disable-pip-version-check pip-tools==$(PIP_TOOLS_VERSION) && \
		touch $(LOCK_TOOLS)/.pip-tools-$(PIP_TOOLS_VERSION); fi
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
		--extra dev --all-build-deps --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_FLAGS) \
		-o requirements.lock pyproject.toml

kafka-jars: $(VENV_STAMP) ## Fetch the Apache Kafka jars with Maven into .local/kafka-libs (once)
	@$(REQUIRE_JAVA)
	$(PY) -m streamml.localkafka jars

kafka-up: kafka-jars ## Start a local KRaft Kafka on 127.0.0.1 (BROKERS=3 for a 3-broker cluster, SECURE=1 for TLS+SCRAM+ACLs)
	$(PY) -m streamml.localkafka up --brokers $(BROKERS) --port $(PORT) $(if $(filter 1 true yes,$(SECURE)),--secure,--no-secure)

registry-dist: $(VENV_STAMP) ## Fetch Apicurio Registry (Schema Registry API) with Maven into .local (once)
	@$(REQUIRE_JAVA)
	$(PY) -m streamml.localregistry fetch

registry-up: registry-dist ## Start a local Schema Registry on 127.0.0.1 (prints STREAMML_SCHEMA_REGISTRY_URL)
	$(PY) -m streamml.localregistry up

registry-down: $(VENV_STAMP) ## Stop the local Schema Registry
	$(PY) -m streamml.localregistry down

kafka-down: $(VENV_STAMP) ## Stop the local Kafka
	$(PY) -m streamml.localkafka down

kafka-logs: $(VENV_STAMP) ## Show the last lines of the local Kafka's logs
	$(PY) -m streamml.localkafka logs

kafka-status: $(VENV_STAMP) ## Is the local Kafka running?
	$(PY) -m streamml.localkafka status

topics: $(VENV_STAMP) ## Create/verify all declared topics (and the demo pipeline's) on the broker
	$(KAFKA_ENV) $(BIN)/streamml topics create --pipeline $(DEMO_PIPELINE)

lint: $(VENV_STAMP) ## Check style, imports and types (changes nothing)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV_STAMP) ## Format the code and sort imports
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

codegen: $(VENV_STAMP) ## Regenerate streamml/records.py from schemas/*.avsc
	$(PY) -m streamml.codegen

k8s-manifests: $(VENV_STAMP) ## Regenerate deploy/k8s/**/generated/ (Deployments, KafkaTopics, KafkaUsers+ACLs, KEDA) from the code
	$(PY) -m streamml.k8s

test: lint test-unit test-integration test-e2e ## Lint + unit + integration + e2e (starts and stops its own broker)

test-unit: $(VENV_STAMP) ## Unit tests (no broker)
	$(PY) -m pytest tests/unit -q

test-integration: kafka-jars registry-dist ## Integration tests against a real Kafka broker (and Schema Registry) started by the tests
	$(PY) -m pytest tests/integration -q

test-e2e: kafka-jars registry-dist ## End-to-end tests of whole services against a real broker
	@if ls tests/e2e/test_*.py >/dev/null 2>&1; then $(PY) -m pytest tests/e2e -q --durations=12; else echo "no e2e tests yet"; fi

demo: kafka-up ## Whole system live: broker, Schema Registry (REGISTRY=0: none), services (INSTANCES=2: two of each; SECURE=1: TLS, SCRAM, ACLs), a drifting Agrawal stream and `streamml top`
	@mkdir -p .local/logs
	@if [ -n "$(REGISTRY_ON)" ] && [ -z "$$STREAMML_SCHEMA_REGISTRY_URL" ]; then \
		$(MAKE) --no-print-directory registry-dist >/dev/null && $(PY) -m streamml.localregistry up; fi
	@if [ -z "$$STREAMML_SIGNING_KEY" ] && [ ! -s $(DEMO_KEY_FILE) ]; then \
		(umask 077 && $(PY) -c 'import secrets; print(secrets.token_hex(32))' > $(DEMO_KEY_FILE)) && \
		echo "created a local demo signing key in $(DEMO_KEY_FILE) (never commit it)"; fi
	@if [ -z "$$STREAMML_MODEL_VERIFY_KEYS" ] && [ ! -s $(DEMO_MODEL_KEY) ]; then \
		$(BIN)/streamml keys generate $(DEMO_MODEL_KEY) --comment demo >/dev/null && \
		echo "created a local demo model signing key pair in $(DEMO_MODEL_KEY) (never commit it)"; fi
	@if [ -n "$(SECURE_ON)" ]; then \
		env $$(cat $(KAFKA_HOME_DIR)/admin.env) $(BIN)/streamml acl apply --pipeline pipelines/agrawal.yaml && \
		$(PY) -m streamml.localkafka client-env --user streamml-cli > $(CLI_ENV_FILE); \
	else rm -f $(CLI_ENV_FILE); fi
	$(DEMO_ENV) $(BIN)/streamml topics create --pipeline agrawal
	$(DEMO_ENV) $(PY) -m streamml.stack up --instances $(INSTANCES) $(if $(SECURE_ON),--users-dir $(KAFKA_HOME_DIR)/users,)
	@# Debian's `prometheus` scraping the services just started (skipped with a note if not installed).
	$(PY) -m streamml.promstack up --optional
	$(DEMO_ENV) $(BIN)/streamml pipeline apply pipelines/agrawal.yaml
	@$(STOP_DEMO_PRODUCER)
	$(DEMO_ENV) setsid $(BIN)/streamml produce "$(DEMO_SOURCE)" --pipeline agrawal --rate $(DEMO_RATE) \
		--limit $(DEMO_EVENTS) --no-progress > .local/logs/producer.log 2>&1 & echo $$! > $(DEMO_PRODUCER_PID)
	@echo "producing $(DEMO_EVENTS) events at $(DEMO_RATE)/s (pid $$(cat $(DEMO_PRODUCER_PID)), log .local/logs/producer.log)"
	@# One shell line, so the summary still prints when Ctrl-C ends the view (everything else keeps running).
	@$(DEMO_ENV) $(BIN)/streamml top --duration $(DEMO_SECONDS); \
	echo; echo "Still running in the background (watch again: $(BIN)/streamml top; stop it all: make down):"; \
	$(PY) -m streamml.localkafka status | head -1 | sed 's/^/  kafka /'; \
	ps -o pid=,args= -p "$$(grep -o '"pid": [0-9]*' .local/stack.json | grep -o '[0-9]*$$' | paste -sd, -)" \
		| cut -c1-90 | sed 's/^ */  /'; \
	if url=$$($(PY) -m streamml.promstack url); then echo "  prometheus $$url (alerts $$url/alerts)"; fi; \
	if $(PY) -m streamml.localregistry status >/dev/null 2>&1; then \
		echo "  schema registry $$($(PY) -m streamml.localregistry url)"; fi; \
	if kill -0 $$(cat $(DEMO_PRODUCER_PID)) 2>/dev/null; then \
		echo "  $$(cat $(DEMO_PRODUCER_PID)) producer (log .local/logs/producer.log)"; \
	else echo "  (the producer has finished: $$(tail -1 .local/logs/producer.log))"; fi

down: $(VENV_STAMP) ## Stop everything `make demo` started: producer, Prometheus, services, Schema Registry, local Kafka
	@$(STOP_DEMO_PRODUCER)
	$(PY) -m streamml.promstack down
	$(PY) -m streamml.stack down
	$(PY) -m streamml.localregistry down
	@$(MAKE) --no-print-directory kafka-down

bench: kafka-jars quix-venv ## Benchmark (not a test): data path, latency, swaps, learner, capacity, Quix Streams side by side, closed loop; tables + a JSON last line (~10 min; SECURE=1 adds predictor and e2e on a secured cluster)
	$(PY) -m bench $(if $(filter 1 true yes,$(SECURE)),--secure,)

QUIX_VENV := .local/quix-venv
QUIX_STAMP := $(QUIX_VENV)/.stamp-$(shell cat bench/quix-requirements.txt 2>/dev/null | cksum | cut -d' ' -f1)

quix-venv: $(QUIX_STAMP) ## The Quix Streams venv make bench compares with (its own: Quix pins an older confluent-kafka)

$(QUIX_STAMP):
	rm -rf $(QUIX_VENV) && $(PYTHON) -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/pip install -q --disable-pip-version-check -r bench/quix-requirements.txt
	touch $@

fuzz: kafka-jars ## Hostile-input benchmark (not a test): >=100k hostile records + 10k HTTP bodies against the running stack; JSON last line
	$(PY) -m bench.fuzz

chaos: kafka-jars ## Fail-over benchmark (not a test): 3 brokers, 2 instances of each service, kills and a broker restart, both guarantees; JSON last line (CHAOS_EVENTS=, CHAOS_RATE=)
	$(PY) -m bench.chaos

prometheus-check: $(VENV_STAMP) ## Check the Prometheus configs and rules, run the alert unit tests, check the dashboards are generated
	@command -v promtool >/dev/null 2>&1 || { echo "error: promtool is not installed (e.g. apt-get install prometheus)" >&2; exit 1; }
	cd deploy/prometheus && promtool check config prometheus.yml && promtool check config prometheus.local.yml
	promtool check rules deploy/prometheus/rules/*.yml
	promtool test rules deploy/prometheus/tests/*.yml
	$(PY) deploy/grafana/generate.py --check

ci: ## Run exactly what CI runs
	.ci/run
