# Two commands for a fresh machine (README): `make demo` runs the main job, `make test` sets
# everything up and runs the tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/scoremerge: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned first: a CPU machine gets the CPU build, not a multi-GB CUDA one
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,demo]'
	touch $@

demo: $(BIN)/scoremerge
	$(BIN)/scoremerge demo --out runs/demo

test: $(BIN)/scoremerge
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/scoremerge
	$(BIN)/python -m pytest -q bench --benchmark-columns=min,median,rounds -s

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache .benchmarks
