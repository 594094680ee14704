# The two commands of the README: `make demo` and `make test`.
# Both create .venv if missing, install tangomesh into it, and (as root) the
# Debian packages the tests need. Nothing else has to be installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STARTER := /usr/lib/tango/Starter
DEMO_HOME ?= $(CURDIR)/.tangomesh
PYTEST_ARGS ?=

.PHONY: demo test bench system-deps venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

# Debian's packages the tests run for real: Starter (what Astor drives) and
# tango_admin; Slurm's controller, node daemon, clients and munge (a one-node
# cluster the Slurm tests start themselves, no systemd needed); iproute2 for
# the network namespaces that stand for hosts.
SYSTEM_PACKAGES := tango-starter libtango-tools slurmctld slurmd slurm-client munge iproute2
system-deps:
	@if [ -x $(STARTER) ] && command -v tango_admin >/dev/null && [ -x /usr/sbin/slurmctld ] && \
	  [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null && [ -x /usr/sbin/munged ] && command -v ip >/dev/null; then \
	  exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ]; then \
	  echo "missing Debian packages: run 'sudo apt-get install $(SYSTEM_PACKAGES)' or make as root"; exit 1; \
	fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES)

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Starts the embedded Tango DB and the mesh, runs a simulated raster with live
# progress, prints the summary, takes everything down (DEMO_ARGS=--keep keeps it).
DEMO_ARGS ?=
demo: $(STAMP)
	TANGOMESH_HOME=$(DEMO_HOME) $(BIN)/tangomesh demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'   # PyMca, the XRF reference (compiles: a few minutes once)
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_sink.py
	$(BIN)/python benchmarks/bench_writers.py
	$(BIN)/python benchmarks/bench_modalities.py
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_autoscale.py
	$(BIN)/python benchmarks/bench_ingest_pcap.py
	$(BIN)/python benchmarks/bench_ingest_xspress.py

clean:
	-$(BIN)/tangomesh down 2>/dev/null
	rm -rf $(VENV) .venv-sims .tangomesh .pytest_cache .hypothesis
