# The two commands of the README: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmray-installed

.PHONY: install demo test test-unit clean-runs

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) dev
	touch $(STAMP)

install: $(STAMP)

## Run the whole pipeline end to end on an embedded local Ray (configs/pipeline/tiny.yaml).
demo: install
	$(VENV)/bin/llmray pipeline --config configs/pipeline/tiny.yaml $(ARGS)

## Run the test suite (unit, Ray, end-to-end); under 20 minutes on 2 CPU cores.
test: install
	$(PY) -m pytest tests $(ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(ARGS)

clean-runs:
	rm -rf runs
