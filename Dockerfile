# syntax=docker/dockerfile:1
#
# bisenet-serve: BiSeNetV1 semantic segmentation over REST (8000) and gRPC (50051).
#
#   docker build -t bisenet-serve:0.1.0 .
#   docker run --gpus all --shm-size 2g -p 8000:8000 -p 50051:50051 \
#       -v bisenet-weights:/var/cache/bisenet-serve bisenet-serve:0.1.0
#
# Every setting is an environment variable (BISENET_*, see .env.example and docs/deployment.md).
# The CUDA build of PyTorch in the base image also runs on machines without a GPU
# (BISENET_DEVICE=cpu or auto).

# PyTorch 2.9.0 with CUDA 12.8 and cuDNN 9 (runtime flavour, no compilers). CUDA 12.8 needs an
# NVIDIA driver >= 570 on the host (or >= 525 through CUDA's minor-version compatibility).
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------------------
# builder: a virtual environment with the project and its pinned dependencies. It sees the base
# image's site-packages, so torch (and its CUDA libraries) is used from there and never replaced.
FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# --without-pip: the base image's pip (visible through the system site-packages) installs into it.
RUN python -m venv --without-pip --system-site-packages /opt/venv \
    && python -c "import torch; print('torch==' + torch.__version__)" > /opt/torch-constraint.txt

COPY docker/constraints.txt /src/docker/constraints.txt
COPY pyproject.toml README.md /src/
COPY model /src/model
COPY service /src/service
COPY proto /src/proto

# Requirements come from pyproject.toml, exact versions from docker/constraints.txt, and torch is
# held at the base image's build. The import check runs isolated (-I), against the installed copy.
RUN /opt/venv/bin/python -m pip install --no-cache-dir \
        --constraint /opt/torch-constraint.txt \
        --constraint docker/constraints.txt \
        . \
    && /opt/venv/bin/python -I -c "import torch, model, service.__main__, service.server; print('torch', torch.__version__)"

# ---------------------------------------------------------------------------------------------
# runtime: the base image, the virtual environment, an unprivileged user. No sources, no caches.
FROM ${BASE_IMAGE} AS runtime

ARG APP_UID=10001
ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="bisenet-serve" \
      org.opencontainers.image.description="Real-time BiSeNetV1 semantic segmentation over REST and gRPC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid "${APP_UID}" bisenet \
    && useradd --system --uid "${APP_UID}" --gid bisenet --create-home --home-dir /home/bisenet \
        --shell /usr/sbin/nologin bisenet \
    && mkdir -p /var/cache/bisenet-serve/checkpoints \
    && chown -R bisenet:bisenet /var/cache/bisenet-serve

COPY --from=builder /opt/venv /opt/venv

# Logs go to stdout/stderr unbuffered. The service listens on all interfaces inside the container;
# the rest of the settings keep the service's own defaults unless set at `docker run`/compose time.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BISENET_HOST=0.0.0.0 \
    BISENET_HTTP_PORT=8000 \
    BISENET_GRPC_PORT=50051 \
    BISENET_CACHE_DIR=/var/cache/bisenet-serve/checkpoints

# Downloaded checkpoints (about 50 MB for R18, 240 MB for R50) survive container restarts here.
VOLUME ["/var/cache/bisenet-serve"]

USER ${APP_UID}:${APP_UID}
WORKDIR /home/bisenet

EXPOSE 8000 50051

# Healthy once every model is loaded and warm (weights fetched, CUDA graphs captured): the first
# start downloads checkpoints, so allow a long start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BISENET_HTTP_PORT', '8000') + '/readyz', timeout=4)"]

# SIGTERM starts a graceful drain (BISENET_DRAIN_SECONDS); give `docker stop -t` at least that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
