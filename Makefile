# Benchmarks (see bench/README.md). The test suite is .ci/run.
.PHONY: bench profile

VENV := .venv
PYTHON := $(VENV)/bin/python
BENCH_QUICK ?=

# The same environment as .ci/run: a regular (not editable) install of this checkout with its test
# extras into .venv; the benchmark still runs the checkout's code through PYTHONPATH.
$(VENV)/.bench-installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check '.[test]'
	touch $@

# Every scenario through relayproxy, directly against the sink, and through the aiosmtpd peer; tables
# printed and written to bench/results/latest.md. BENCH_QUICK=1 for a ~1 minute smoke run.
bench: $(VENV)/.bench-installed
	bench/setup
	ulimit -n $$(ulimit -Hn) 2>/dev/null; \
	BENCH_FROM_MAKE=1 BENCH_QUICK=$(BENCH_QUICK) PYTHONPATH=. $(PYTHON) bench/run.py

# The proxy under cProfile (twistd --profiler) in the 20 sessions x 10 KiB, 10 per connection
# scenario; the top functions go to bench/results/profile.txt.
profile: $(VENV)/.bench-installed
	bench/setup
	ulimit -n $$(ulimit -Hn) 2>/dev/null; \
	BENCH_QUICK=$(BENCH_QUICK) PYTHONPATH=. $(PYTHON) bench/run.py --profile bench/results/profile.txt
