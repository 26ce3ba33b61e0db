# syntax=docker/dockerfile:1
# The export / engine-build job's image: torch, ONNX and the exporter (`pip install
# .[export]`), plus the committed demo checkpoints (package data of zoo/). From the
# repository root:
#   docker build -f deploy/docker/export.Dockerfile -t genserve-export .
# torch is pinned in pyproject.toml; from PyPI on x86_64 that is the CUDA build, which a
# GPU engine build wants. For a CPU-only image, point pip at a CPU wheel index:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<cpu wheel index> ...
FROM python:3.11-slim-bookworm
ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/tmp
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY export ./export
COPY zoo ./zoo
# The project itself, pinned by pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[export]" \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin genserve
# Runs read-only in Kubernetes with an emptyDir on /tmp; writes only the repository
# volume (deploy/jobs/model-export).
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "export"]
CMD ["demo", "--repository", "/model-store"]
