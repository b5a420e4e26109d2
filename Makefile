# Quickstart: `make serve` runs the app, `make test` runs the tests. Both set up .venv first.
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first: a bare `torch` requirement would pull the CUDA build (several GB).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: setup serve test models
setup: $(STAMP)

models: $(STAMP)
	$(PY) -m training.defaults

# Ray's own latency setting: user code on the replica's main loop, direct ingress, fewer log writes.
# It must be in the environment of the process that starts Ray (bench and tests set it too).
serve: models
	RAY_SERVE_THROUGHPUT_OPTIMIZED=1 .venv/bin/serve run serve_config.yaml

test: $(STAMP)
	$(PY) -m pytest
