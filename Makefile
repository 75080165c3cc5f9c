# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if missing, installs raydecode, runs the main job on embedded defaults
#   make test   same environment, the full test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-cluster install bench clean

install: $(STAMP)

# warm_bytecode: every Ray worker is a fresh interpreter; with PYTHONDONTWRITEBYTECODE set (as on CI) each one
# would otherwise recompile torch, ray and diffusers from source (~50 s per training run on 2 cores). It writes the
# bytecode of the modules raydecode imports and of the packages its processes load lazily (Ray's dashboard and
# agents, diffusers, MLflow, the local stack's servers): ~30 s, not the whole environment (uv --compile-bytecode: 50 s).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing raydecode and its dependencies into $(VENV) (torch CUDA wheels: a few GB the first time)"
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[test]' \
		|| $(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python tools/warm_bytecode.py
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raydecode demo --summary work/demo/summary.json

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

# only the cluster-deployment end-to-end tests (also in `make test`): the local stack, a Ray cluster with a 0-CPU
# head that gains a worker node while a job waits, `ray job submit` of four stages (about 6 minutes)
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q --durations=5 -m cluster tests

# every benchmark one after another (logs in work/bench/), then one table of ratios (benchmarks/run_all.py)
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf work .pytest_cache
