# syntax=docker/dockerfile:1
#
# CUDA image (default target):  docker build -t ollama-gateway .
#   fewer GPU generations build faster: --build-arg CUDA_ARCHITECTURES=89
# CPU-only image:               docker build --target cpu -t ollama-gateway:cpu .
# Run:  docker run --gpus all -p 11434:11434 -v /srv/models:/models ollama-gateway
#
# Builders compile every wheel (llama-cpp-python from its sdist); runtimes install those
# wheels from a bind mount, so neither compilers nor the wheel files end up in a layer.

ARG CUDA_VERSION=12.6.3
ARG UBUNTU=ubuntu24.04

# ---- CUDA builder ---------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS builder
# 75 Turing (T4), 80 A100, 86 Ampere consumer/A10, 89 Ada (L4, 4090), 90 Hopper (H100).
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
# GGML_NATIVE=OFF: without it the CPU code is tuned to the build host (-march=native)
# and may crash on the machine that runs the image. LLAVA is not used by the gateway.
ARG EXTRA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       python3 python3-dev python3-venv build-essential cmake ninja-build \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
WORKDIR /src
COPY requirements.txt .
# The driver's libcuda.so.1 only exists at run time (the NVIDIA container toolkit mounts
# it); link against the toolkit's stub while building.
RUN CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} ${EXTRA_CMAKE_ARGS}" \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    LD_LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    /opt/build/bin/pip wheel --wheel-dir /wheels -r requirements.txt

# ---- CPU builder ----------------------------------------------------------------------
FROM python:3.11-slim AS cpu-builder
# x86-64-v3 (AVX2/FMA, any x86 server since ~2015) instead of the build host's own CPU.
# For a CPU without AVX2 pass --build-arg CPU_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF".
ARG CPU_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.txt .
RUN CMAKE_ARGS="${CPU_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel --wheel-dir /wheels -r requirements.txt

# ---- CPU runtime ----------------------------------------------------------------------
FROM python:3.11-slim AS cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GATEWAY_CONFIG=/app/config/gateway.yaml \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=11434 \
    XDG_CACHE_HOME=/app/cache
# libgomp1: llama.cpp's CPU threads (OpenMP).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/gateway gateway
WORKDIR /app
COPY requirements.txt .
RUN --mount=type=bind,from=cpu-builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && pip install --no-index --find-links=/wheels -r requirements.txt
COPY app.py wsgi.py gunicorn.conf.py ./
COPY gateway ./gateway
COPY providers ./providers
COPY config ./config
RUN mkdir -p /app/data /app/cache /models && chown -R 10001:10001 /app/data /app/cache /models
VOLUME ["/models", "/app/data"]
USER 10001:10001
EXPOSE 11434
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GATEWAY_PORT', '11434'), timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]

# ---- CUDA runtime (default target: keep it last) --------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GATEWAY_CONFIG=/app/config/gateway.yaml \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=11434 \
    XDG_CACHE_HOME=/app/cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The same Ubuntu python3 as the builder: the wheels are built for it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/gateway gateway
WORKDIR /app
COPY requirements.txt .
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && pip install --no-index --find-links=/wheels -r requirements.txt
COPY app.py wsgi.py gunicorn.conf.py ./
COPY gateway ./gateway
COPY providers ./providers
COPY config ./config
RUN mkdir -p /app/data /app/cache /models && chown -R 10001:10001 /app/data /app/cache /models
VOLUME ["/models", "/app/data"]
USER 10001:10001
EXPOSE 11434
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GATEWAY_PORT', '11434'), timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
