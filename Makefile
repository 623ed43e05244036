# The two commands of the README, and their neighbours. Each target creates .venv first if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_FLAGS ?= -q

.PHONY: env test test-slow lab lab-quick demo clean

env:
	@bash scripts/setup.sh

# The CI suite (what .ci/run calls). pytest's exit code 5 (no tests collected) fails the target.
test: env
	$(PY) -m pytest -m "not slow" $(PYTEST_FLAGS)

# Tests too slow for CI's 20-minute budget on 2 cores.
test-slow: env
	$(PY) -m pytest -m slow $(PYTEST_FLAGS)

# The main job on its embedded default: the lab reproduces both papers' findings with tiny models on the CPU
# (about 31 minutes on 2 cores; finished jobs are reused when it runs again). Report: runs/lab/results.md.
lab: env
	$(VENV)/bin/opd lab

# The lab's whole pipeline shrunk to about a minute (checks the plumbing, not the findings).
lab-quick: env
	$(VENV)/bin/opd lab --quick

# Build two tiny models and distill one into the other (CPU, about a minute; progress lines while it works).
# The table: greedy accuracy of the student before and after OPD and of the teacher, and the teacher KL.
demo: env
	$(VENV)/bin/opd demo

clean:
	rm -rf runs .pytest_cache
