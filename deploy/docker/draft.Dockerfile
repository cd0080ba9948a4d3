# syntax=docker/dockerfile:1
# A DySpec draft worker (`python -m draft_service`): drafts token trees on a small GPU and
# drives the decode loop against the target (dyspec.v1.DraftWorker).
# Build from the repository root:
#   docker build -f deploy/docker/draft.Dockerfile -t ghcr.io/dyspec/draft:0.1.0 .

# python:3.11.13-slim-bookworm, pinned by the digest that public projects pin for this tag. It was
# not re-resolved from here (no registry access): confirm with
# `docker buildx imagetools inspect python:3.11.13-slim-bookworm` before a release.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS build
# CUDA build of torch for GPU nodes (match the nodes' driver); https://download.pytorch.org/whl/cpu for CPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# The exact pins first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements.lock /src/requirements.lock
RUN /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY dyspec /src/dyspec
COPY engine /src/engine
COPY proto /src/proto
COPY serving /src/serving
COPY model_store /src/model_store
COPY target_service /src/target_service
COPY draft_service /src/draft_service
COPY orchestrator /src/orchestrator
COPY deploy /src/deploy
RUN /opt/venv/bin/pip install --no-deps /src
# The packed linear layers' kernel (engine/kernels/small_gemm.c), built here: the runtime stage has
# no compiler. The ISA is picked per call at run time, so one build serves AVX2 and AVX-512 nodes.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && /opt/venv/bin/python -m engine.native /opt/venv/lib/dyspec/small_gemm.so \
    && rm -rf /var/lib/apt/lists/*

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --no-log-init --create-home --uid 10001 --user-group dyspec
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    DYSPEC_KERNEL_LIBRARY=/opt/venv/lib/dyspec/small_gemm.so
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/dyspec
EXPOSE 50062
ENTRYPOINT ["python", "-m", "draft_service"]
