# The README's two commands are `make train` (main job) and `make test`.
# Both create .venv and install kerasdist with pinned ranges from setup.cfg.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kerasdist-installed

.PHONY: install train test lint docs bench clean engines

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,docs,bench,ray]"
	touch $(STAMP)

install: $(STAMP)

# Main job: a real 2-worker data-parallel training run on 127.0.0.1, on
# generated data (no download), under the fault-tolerant launcher.
train: install
	$(VENV)/bin/kerasdist-run --num_workers 2 --max_restarts 2 -- \
		$(PY) examples/quickstart.py --epochs 3

# Real engines for the tests: Debian's SLURM (slurmctld, slurmd, client
# commands) and munge, installed with apt-get when missing (as root, else
# through sudo). The SLURM tests start and stop their own daemons.
engines:
	command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			slurm-wlm munge; }
	test -s /etc/munge/munge.key || $(SUDO) mungekey --create 2>/dev/null \
		|| $(SUDO) create-munge-key -f

test: install engines
	$(PY) -m ruff check kerasdist tests benchmarks examples
	$(PY) -m pytest -q tests

docs: install
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

# Bazel: `bazel test //...` (the fast unit tests as py_test targets, run with
# the .venv interpreter), offline with Debian's bazel-bootstrap 4.2.3, which
# is installed with apt-get when missing (as root, else through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: bazel-test
bazel-test: install
	command -v bazel >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q bazel-bootstrap; }
	KERASDIST_PYTHON=$(abspath $(PY)) bazel test //...

bench: install
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) docs/_build build *.egg-info
