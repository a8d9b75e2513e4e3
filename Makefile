# The README's two commands are `make train` (main job) and `make test`.
# Both create .venv and install kerasdist with pinned ranges from setup.cfg.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kerasdist-installed

.PHONY: install train test lint docs bench clean engines test-oldest test-stress bench-jax-venv

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,docs,bench,ray,clients,federated]"
	touch $(STAMP)

install: $(STAMP)

# Main job: a real 2-worker data-parallel training run on 127.0.0.1, on
# generated data (no download), under the fault-tolerant launcher.
train: install
	$(VENV)/bin/kerasdist-run --num_workers 2 --max_restarts 2 -- \
		$(PY) examples/quickstart.py --epochs 3

# Real engines for the tests: Debian's SLURM (slurmctld, slurmd, client
# commands), munge, nftables (emulated-host partitions) and OpenSSH (server
# and client, for SshStarter), installed with apt-get when missing (as root,
# else through sudo). The SLURM and ssh tests start and stop their own
# daemons; no system-wide sshd is started: openssh-server's postinst would
# start ssh.service, so a policy-rc.d (when the machine has none) denies it
# during the install.
engines:
	command -v slurmctld >/dev/null && command -v munged >/dev/null && \
		command -v nft >/dev/null || { \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			slurm-wlm munge nftables; }
	if ! { test -x /usr/sbin/sshd && command -v ssh >/dev/null && \
		command -v ssh-keygen >/dev/null; }; then \
		deny=; test -e /usr/sbin/policy-rc.d || { deny=1; \
			printf '#!/bin/sh\nexit 101\n' | \
			$(SUDO) tee /usr/sbin/policy-rc.d >/dev/null && \
			$(SUDO) chmod 755 /usr/sbin/policy-rc.d; }; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends openssh-server openssh-client; \
		status=$$?; test -z "$$deny" || $(SUDO) rm -f /usr/sbin/policy-rc.d; \
		exit $$status; \
	fi
	test -s /etc/munge/munge.key || $(SUDO) mungekey --create 2>/dev/null \
		|| $(SUDO) create-munge-key -f
	command -v shellcheck >/dev/null || { \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			shellcheck; }
	command -v ip >/dev/null && command -v tc >/dev/null || { \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			iproute2; }

test: install engines
	$(PY) -m ruff check kerasdist tests benchmarks examples
	shellcheck -s sh kerasdist/launch/ssh_wrapper.sh
	$(PY) -m pytest -q --durations=30 tests

# The launcher, elastic, ssh, hosts and recovery tests STRESS_ROUNDS times
# in a row while one busy-loop process per core loads the machine (started
# here, stopped by its pid even when a round fails): timing that holds only
# on a quiet machine fails here.
STRESS_ROUNDS ?= 5
STRESS_TESTS ?= tests/test_launch.py tests/test_launch_hosts.py \
	tests/test_launch_policy.py tests/test_elastic_hosts.py \
	tests/test_elastic_resize.py tests/test_ssh_starter.py \
	tests/test_hosts.py tests/test_recovery_defects.py \
	tests/test_recovery_workers.py
test-stress: install engines
	hogs=; for _ in $$(seq $$(nproc)); do \
		$(PY) -c 'while True: pass' & hogs="$$hogs $$!"; done; \
	trap 'kill $$hogs 2>/dev/null' EXIT INT TERM; \
	for round in $$(seq $(STRESS_ROUNDS)); do \
		echo "== stress round $$round/$(STRESS_ROUNDS)"; \
		$(PY) -m pytest -q $(STRESS_TESTS) || exit 1; \
	done

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

# Oldest supported versions: the lower ends of setup.cfg's ranges in their
# own venv (never the main one), running the core suite (strategies, data,
# backups, launcher). Keep the pins equal to setup.cfg's lower bounds.
# Keras < 3.10 fails data-parallel parity with TF 2.16.1 (no loss scaling by
# replicas before 3.8, keras-team/keras#19891; reported metrics differ
# before 3.10): see docs/guide/benchmarks.md.
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.kerasdist-installed
OLDEST_PINS := tensorflow==2.16.1 keras==3.10.0
OLDEST_TESTS := tests/test_mirrored_parity.py tests/test_multi_worker.py \
	tests/test_strategy_selection.py tests/test_data.py \
	tests/test_backup_and_restore.py tests/test_launch.py \
	tests/test_cluster.py

$(OLDEST_STAMP): setup.cfg pyproject.toml Makefile
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q -e ".[test]" $(OLDEST_PINS)
	$(OLDEST_PY) -m pip check
	touch $(OLDEST_STAMP)

# Tests needing an engine (marked real_component: Ray, SLURM, ...) run in the
# main suite; this venv has only the core dependencies.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -c "import tensorflow as tf, keras; \
		print('oldest: tensorflow', tf.__version__, 'keras', keras.__version__)"
	$(OLDEST_PY) -m pytest -q -p no:cacheprovider -m "not real_component" \
		$(OLDEST_TESTS)

# peer_step_time's JAX half: Keras 3 on JAX in its own venv (never the main
# one), with the same Keras version as .venv.
JAX_VENV ?= .venv-jax
JAX_STAMP := $(JAX_VENV)/.kerasdist-installed

$(JAX_STAMP): $(STAMP) Makefile
	test -x $(JAX_VENV)/bin/python || $(PYTHON) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/python -m pip install -q "jax[cpu]<1" \
		"keras==$$($(PY) -c 'import keras; print(keras.__version__)')"
	touch $(JAX_STAMP)

bench-jax-venv: $(JAX_STAMP)

bench: install bench-jax-venv
	KERASDIST_JAX_PYTHON=$(abspath $(JAX_VENV))/bin/python \
		$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(JAX_VENV) docs/_build build *.egg-info
