# flashport developer tasks. On a fresh machine with only Python: `make demo`, `make test`.

PYTHON    ?= python3
VENV      ?= .venv
STAMP     := $(VENV)/.flashport-stamp
FLASHPORT := $(VENV)/bin/flashport
TINY      ?= models/tiny
PROMPT    ?= Tell me about the sea.
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(STAMP)

# Re-run only when the dependencies (or the setup script) change.
$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON="$(PYTHON)" VENV="$(VENV)" bash scripts/setup.sh
	@touch $@

$(TINY)/config.json: | $(STAMP)
	$(FLASHPORT) init-tiny $(TINY)

# The main job: start `flashport serve` on the tiny model, one chat request through the official
# openai client, print the reply, stop the server.
demo: setup $(TINY)/config.json
	$(VENV)/bin/python scripts/demo.py --model $(TINY) --prompt "$(PROMPT)" --max-tokens 48

test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) models/
