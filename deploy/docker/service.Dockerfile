# syntax=docker/dockerfile:1
# genserve's serving image: the torch-free serving dependencies (`pip install .` without
# extras installs exactly those) and the services/ package, nothing else. From the
# repository root:
#   docker build -f deploy/docker/service.Dockerfile -t genserve-service .
# Only pyproject.toml, README.md and services/ are copied, so the wheel holds services/
# alone (export/ and zoo/, which need torch, are not in the build context's copies).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# Wheels for genserve and every dependency, so the final stage installs without
# compilers or build tools.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    BENTOML_HOME=/var/lib/bentoml \
    HOME=/tmp \
    GENSERVE_MODEL_REPOSITORY=/models
# --no-index: only the wheels built above; nothing else is fetched here (their versions
# were resolved against pyproject.toml's pins in the build stage, hence no pins here).
# The torch check fails the build if anything ever drags torch into the serving image.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels genserve \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin genserve \
    && install -d -o 10001 -g 10001 /var/lib/bentoml /models
# Kubernetes runs this read-only with emptyDirs on /tmp and $BENTOML_HOME
# (deploy/base/genserve-deployment.yaml); the model repository is mounted on /models.
USER 10001:10001
WORKDIR /tmp
EXPOSE 3000
ENTRYPOINT ["bentoml", "serve", "services.service:GenServe"]
CMD ["--host", "0.0.0.0", "--port", "3000"]
