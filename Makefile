# The two commands of README.md. Both create ./.venv on first use.
# On CPU-only machines torch==2.13.0 is the CPU wheel; GPU users: see README ("GPU").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/ildseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/ildseg
	$(BIN)/ildseg demo $(ARGS)

test: $(BIN)/ildseg
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) ildseg-demo .pytest_cache
