# ptutils worker image (deploy/README.md). Multi-stage: the build stage installs ptutils
# and its extras into /opt/venv; the runtime stage copies that venv, nothing else.
#
#   docker build -t ptutils:cpu .                                   # CPU (default)
#   docker build --build-arg VARIANT=cuda -t ptutils:cuda .         # CUDA, PyTorch's base
#   docker run --rm ptutils:cpu worker --gpus none                  # default: `ptutils worker`
#
# torch is pinned as the Makefile pins it (TORCH_VERSION == its TORCH): the CPU variant
# takes the CPU wheel from PyTorch's index; the CUDA variant starts from the official
# PyTorch image, whose torch the venv sees (--system-site-packages) and pip keeps.
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

# --- the two bases: the same /opt/venv on either ----------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-cuda
# torch comes with the image: the venv sees it and pip leaves it alone
ENV TORCH_INDEX=""
RUN python -m venv --system-site-packages /opt/venv

# --- build: ptutils and its extras into /opt/venv ---------------------------------------
# base-VARIANT is a stage of this file, not an image to tag:
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG TORCH_VERSION
ARG EXTRAS=data,plot,search
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY ptutils ./ptutils
COPY workers ./workers
COPY orchestrator ./orchestrator
# As `make install`: the pinned torch first, then the package with the same pin (so pip
# never swaps torch for another build), non-editable. DL3013: `.` is this package; its
# dependencies are the ranges of setup.cfg, torch is pinned.
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_INDEX" ]; then \
        pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"; \
    fi \
 && pip install ".[${EXTRAS}]" "torch==${TORCH_VERSION}" \
 && python -c "import torch, ptutils, workers.app; print('torch', torch.__version__)"

# --- runtime -----------------------------------------------------------------------------
# base-VARIANT is a stage of this file, not an image to tag:
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --user-group ptutils \
 && mkdir -p /work \
 && chown ptutils:ptutils /work
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PTUTILS_METRICS_PORT=9108
USER 10001
WORKDIR /work
EXPOSE 9108
# SIGTERM is a preemption: checkpoint, requeue, exit within --grace (give the container
# grace + 15 s: compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['PTUTILS_METRICS_PORT'], timeout=4)"]
ENTRYPOINT ["ptutils"]
CMD ["worker"]
