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

# Ray Serve's latency settings (deployments/serve_env.py says what each does; a test keeps this line
# equal to that table). They must be in the environment of the process that starts Ray.
SERVE_ENV := RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_PROXY_USE_GRPC=1

serve: models
	$(SERVE_ENV) .venv/bin/serve run serve_config.yaml

test: $(STAMP)
	$(PY) -m pytest
