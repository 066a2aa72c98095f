# Two commands on a fresh machine: `make run` (the default study) and `make test`.
# Everything is installed into .venv by the project itself (pins in pyproject.toml).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SLURM  := tests/slurm/cluster.sh

.PHONY: setup run test test-unit test-slurm lint bench clean-results

# --- environment: create .venv when missing, (re)install when pyproject.toml changes
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# --- the main job: the embedded default study on the CPU, no downloads
# When it ran the whole study (every job's benchmark file is new), its wall time goes to
# results/benchmarks/pipeline-wall.txt and `scm bench overhead` splits it into the work the runs report and
# the overhead around it; a partial or empty re-run says so instead of printing a meaningless split. A fork server (scm serve, scm/forkserver.py) imports
# torch once for all the study's `scm` jobs; it starts with the thread counts Snakemake gives a 1-thread job.
run: setup
	@mkdir -p results/benchmarks results/logs; start=$$(date +%s); \
	sockdir=$$(mktemp -d); touch $$sockdir/start; \
	OMP_NUM_THREADS=1 GOTO_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 VECLIB_MAXIMUM_THREADS=1 \
	  NUMEXPR_NUM_THREADS=1 $(VENV)/bin/scm serve --socket $$sockdir/scm.sock > results/logs/forkserver.log 2>&1 & \
	server=$$!; trap 'kill $$server 2>/dev/null; wait $$server 2>/dev/null; rm -rf '"$$sockdir" EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; \
	SCM_SERVER=$$sockdir/scm.sock PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --profile profiles/local; rc=$$?; \
	if [ $$rc -eq 0 ]; then \
	  total=$$(find results/benchmarks -name '*.tsv' | wc -l); ran=$$(find results/benchmarks -name '*.tsv' -newer $$sockdir/start | wc -l); \
	  if [ $$ran -gt 0 ] && [ $$ran -eq $$total ]; then \
	    echo "$$(( $$(date +%s) - start )) s: wall time of the last complete make run" > results/benchmarks/pipeline-wall.txt; \
	    $(VENV)/bin/scm bench overhead --results results --cores 2 || true; \
	  else echo "make run: $$ran of $$total jobs ran now: the overhead breakdown needs a run from empty results"; fi; \
	fi; exit $$rc

# --- tests: everything but the SLURM tests, then the SLURM tests against a real local cluster
test: setup
	$(PY) -m pytest -q -m "not slurm and not gpu" tests
	$(MAKE) --no-print-directory test-slurm

test-unit: setup
	$(PY) -m pytest -q tests/unit

# Brings the cluster up (installs Debian's SLURM when missing), always brings it down again.
# Where it cannot come up (not root, not Debian: exit 3) the tests skip, except under CI=true.
test-slurm: setup
	@if [ ! -x $(SLURM) ]; then echo "no $(SLURM): skipping SLURM tests"; exit 0; fi; \
	trap 'bash $(SLURM) down >/dev/null 2>&1 || true' EXIT; \
	bash $(SLURM) up; rc=$$?; \
	if [ $$rc -eq 3 ] && [ "$${CI:-}" != "true" ]; then echo "SLURM cluster unavailable here: skipping"; exit 0; fi; \
	if [ $$rc -ne 0 ]; then echo "SLURM cluster failed to start (exit $$rc)"; exit 1; fi; \
	$(PY) -m pytest -q -m slurm tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The same checks as .pre-commit-config.yaml; CI runs them before the tests.
lint: setup
	$(VENV)/bin/ruff check scm tests bench
	$(VENV)/bin/snakefmt --check Snakefile workflow
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --lint
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --lint --configfile config/gmm.yaml

bench: setup
	$(VENV)/bin/scm bench step --sizes tS tM tL --threads 1

clean-results:
	find results -mindepth 1 -maxdepth 1 ! -name reference -exec rm -rf {} +
