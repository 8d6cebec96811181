# The two commands of README.md. Each sets up .venv by itself on first use (launch/install.sh).
VENV ?= .venv
STAMP := $(VENV)/.tether-installed
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo

.PHONY: demo test test-slurm lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml launch/install.sh
	bash launch/install.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tether demo --run-dir $(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest

# launch/slurm.sbatch on a real Slurm on this machine (installs slurm-wlm and munge when absent; root).
# Kept out of `make test` (minutes of its own); CI runs both.
test-slurm: $(STAMP)
	$(PY) -m pytest -v -m slurm tests/test_slurm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf runs .pytest_cache .hypothesis
