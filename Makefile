# make test   the whole test suite against a real Kafka broker, from nothing
# make demo   the system end to end: broker, topics, MovieLens-1M, a model, a worker, a replay
#             of the test period with a live summary (sketchstream demo; DEMO_ARGS=... adds
#             options, e.g. DEMO_ARGS="--events 20000")
# make lint   ruff check + ruff format --check
#
# Both test and demo create .venv when it is missing (re-installing when pyproject.toml
# changes), start the local Kafka broker unless SKETCHSTREAM_KAFKA points at one, and stop the
# broker they started afterwards, also when a test fails.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WITH_BROKER := ./.ci/with-broker
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: test demo lint install

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing sketchstream and its dependencies into $(VENV) (torch is large) ..."
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	@touch $(STAMP)

test: $(STAMP)
	$(WITH_BROKER) $(BIN)/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(WITH_BROKER) $(BIN)/sketchstream demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
