# Each target sets up its own virtual environment when missing (CPU torch, pinned set).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# SkyPilot, for the tests that load the skypilot tasks with its own loader, in an environment of
# its own: skypilot requires click<8.2, the farm pins click 8.5
SKY_VENV ?= .venv-skypilot

.PHONY: demo test bench lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch; a range that admits a newer torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[worker,dev]'
	touch $@

$(SKY_VENV)/.installed: tests/skypilot-constraints.txt
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install -q -c tests/skypilot-constraints.txt skypilot
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/farm demo --out farm-demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check farm scheduler worker cli deploy tests benchmarks
	$(VENV)/bin/mypy

test: $(VENV)/.installed $(SKY_VENV)/.installed lint
	$(VENV)/bin/pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(SKY_VENV) farm-demo .pytest_cache .mypy_cache .ruff_cache
