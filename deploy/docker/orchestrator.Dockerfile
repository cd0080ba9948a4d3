# syntax=docker/dockerfile:1
# The DySpec orchestrator (`python -m orchestrator`): public gRPC (dyspec.v1.Generation) and
# the OpenAI-compatible HTTP API; it holds only a tokenizer.
# Build from the repository root:
#   docker build -f deploy/docker/orchestrator.Dockerfile -t ghcr.io/dyspec/orchestrator:0.1.0 .

# python:3.11.13-slim-bookworm, pinned by the digest that public projects pin for this tag. It was
# not re-resolved from here (no registry access): confirm with
# `docker buildx imagetools inspect python:3.11.13-slim-bookworm` before a release.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS build
# No GPU work here: the CPU build of torch keeps the image small.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
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

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --no-log-init --create-home --uid 10001 --user-group dyspec
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/dyspec
EXPOSE 50051 8000
ENTRYPOINT ["python", "-m", "orchestrator"]
