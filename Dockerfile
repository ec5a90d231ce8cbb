# syntax=docker/dockerfile:1.7
# The comfys3 worker image: ComfyUI, its custom nodes and models, and the comfys3 worker, all in
# one Python venv (/opt/venv), so custom-node requirements land where ComfyUI imports them.
#
#   GPU (default):  docker build -t comfys3-worker .
#   CPU:            docker build --build-arg DEVICE=cpu -t comfys3-worker:cpu .
#
# Layers are ordered from the slowest-changing to the fastest: ComfyUI, then the custom nodes
# of snapshot/, then the models of models.json, then the comfys3 code. Editing the worker's code
# never re-downloads gigabytes of models.

ARG DEVICE=gpu
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION} AS base-gpu
# Every GPU of the container, one ComfyUI each (one GPU: one ComfyUI, as without it).
ENV COMFYS3_COMFYUI_ARGS="" \
    COMFYS3_GPUS=all

FROM ubuntu:${UBUNTU_VERSION} AS base-cpu
# ComfyUI on a machine without a GPU must be told so.
ENV COMFYS3_COMFYUI_ARGS="--cpu"

# The base is one of the two stages above, picked by DEVICE (gpu | cpu).
# hadolint ignore=DL3006
FROM base-${DEVICE} AS worker

ARG DEVICE
# PyTorch wheel flavour for comfy-cli (cu128 wheels run on the CUDA 12.8 base).
ARG TORCH_CUDA=12.8
# comfy-cli 1.23.0 checks out tag v<COMFYUI_VERSION>. Supported: 0.38.x (default) and 0.3.64;
# the worker finds out at run time which protocol its ComfyUI speaks.
ARG COMFY_CLI_VERSION=1.23.0
ARG COMFYUI_VERSION=0.38.1
# Extra Debian packages some custom nodes need to build (e.g. "build-essential python3-dev").
ARG EXTRA_APT_PACKAGES=""
ARG DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Debian package versions move with the base image's archive; the base tag is what is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates git python3 python3-venv tini libgl1 libglib2.0-0 ${EXTRA_APT_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "comfy-cli==${COMFY_CLI_VERSION}"

# ComfyUI at a pinned release, with PyTorch for the device. comfy-cli installs into the Python
# it runs from: /opt/venv. ComfyUI-Manager is not installed (--skip-manager: since ComfyUI 0.36
# it is the pip package of manager_requirements.txt, loaded only with --enable-manager): a batch
# worker never uses it.
RUN if [ "${DEVICE}" = "cpu" ]; then set -- --cpu; else set -- --nvidia --cuda-version "${TORCH_CUDA}"; fi \
    && comfy --skip-prompt tracking disable \
    && comfy --skip-prompt --workspace /comfyui install --version "${COMFYUI_VERSION}" --skip-manager "$@" \
    && rm -rf /root/.cache

# Custom nodes, at the commits/versions of every snapshot/*_snapshot.json. provision/ needs only
# the standard library here, so it runs from its folder before comfys3 itself is installed
# (the same code as `comfys3 snapshot restore`); any failed node fails the build, by name.
WORKDIR /app
COPY provision/ /app/provision/
COPY snapshot/ /app/snapshot/
RUN PYTHONPATH=/app python -m provision.cli snapshot restore \
        --comfyui /comfyui --python /opt/venv/bin/python --snapshot-dir /app/snapshot \
    && rm -rf /root/.cache

# Models baked into the image (`comfys3 models download`), verified by sha256. MODELS_FILE names
# a models*.json at the root of the build context; empty bakes none (ComfyUI then finds models
# on the RunPod network volume only). A gated model needs a token, passed as a build secret:
#   docker build --secret id=hf_token,env=HF_TOKEN .
ARG MODELS_FILE=models.json
ARG HF_ENDPOINT=https://huggingface.co
COPY models*.json /app/
RUN --mount=type=secret,id=hf_token \
    if [ -n "${MODELS_FILE}" ]; then \
        HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" PYTHONPATH=/app \
        python -m provision.cli models download "/app/${MODELS_FILE}" --dest /comfy-models; \
    fi \
    && mkdir -p /comfy-models

# ComfyUI looks in /comfy-models first, then on the RunPod network volume.
COPY comfyui/extra_model_paths.yaml /comfyui/extra_model_paths.yaml

# The worker, installed editable so workflows/ stays next to the code that loads it.
COPY pyproject.toml README.md /app/
COPY processor/ /app/processor/
COPY triggers/ /app/triggers/
COPY workflows/ /app/workflows/
RUN pip install --no-cache-dir -e "/app[runpod]"

COPY --chmod=0755 start.sh /app/start.sh

ENV COMFYS3_MODE=runpod \
    COMFYS3_COMFYUI_PATH=/comfyui \
    COMFYS3_COMFYUI_PYTHON=/opt/venv/bin/python

# tini reaps ComfyUI's children and forwards SIGTERM, so a stopping worker can release its claim.
ENTRYPOINT ["/usr/bin/tini", "--", "/app/start.sh"]
