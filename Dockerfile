# syntax=docker/dockerfile:1
# EfficientAD server, GPU image: TensorRT 10 and ONNX Runtime (CUDA) on CUDA 12.8 + cuDNN 9. No torch.
#
#   docker build -t efficientad:0.1.0-gpu .
#   docker run --gpus 1 -p 8000:8000 -v ead-models:/models -e EAD_MODEL_DIRS=/models/cookie efficientad:0.1.0-gpu
#
# On first start the entrypoint builds a TensorRT engine per model (minutes) and caches it in
# MODEL_DIR/engines/ on the volume; later starts load it in seconds. See docs: Deployment.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

# ---- 1. the project as a wheel (pure Python; nothing heavy is needed to build it)
FROM ${PYTHON_IMAGE} AS wheel
ARG SETUPTOOLS_VERSION=84.2.1
WORKDIR /src
RUN pip install --no-cache-dir "setuptools==${SETUPTOOLS_VERSION}"
COPY pyproject.toml README.md ./
COPY efficientad ./efficientad
COPY training ./training
COPY export ./export
COPY server ./server
COPY benchmarks ./benchmarks
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# ---- 2. a virtual environment with the server and its GPU runtimes (same base as the final image)
FROM ${CUDA_IMAGE} AS venv
ARG EFFICIENTAD_VERSION=0.1.0
ARG ONNXRUNTIME_GPU_VERSION=1.23.2
ARG TENSORRT_VERSION=10.13.3.9
ARG CUDA_PYTHON_VERSION=12.9.4
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Package versions come from the pinned base image's Ubuntu release (security updates replace old ones).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
# The base install depends on the CPU `onnxruntime`; both wheels own the same module folder, so the
# CPU one is removed and the GPU one reinstalled over it (the documented way to switch).
RUN python3.12 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        "/wheels/efficientad-${EFFICIENTAD_VERSION}-py3-none-any.whl[gpu]" \
        "onnxruntime==${ONNXRUNTIME_GPU_VERSION}" \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
        "tensorrt==${TENSORRT_VERSION}" \
        "tensorrt-cu12==${TENSORRT_VERSION}" \
        "cuda-python==${CUDA_PYTHON_VERSION}" \
    && /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"

# ---- 3. the runtime image: CUDA runtime + cuDNN, Python, the venv; runs as a non-root user
FROM ${CUDA_IMAGE}
ARG EFFICIENTAD_VERSION=0.1.0
LABEL org.opencontainers.image.title="efficientad" \
      org.opencontainers.image.description="EfficientAD anomaly detection server (TensorRT / ONNX Runtime CUDA)" \
      org.opencontainers.image.version="${EFFICIENTAD_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 efficientad \
    && useradd --system --uid 10001 --gid efficientad --home-dir /home/efficientad --create-home efficientad \
    && mkdir -p /models \
    && chown efficientad:efficientad /models
COPY --from=venv /opt/venv /opt/venv
COPY docker/entrypoint /usr/local/bin/efficientad-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EAD_HOST=0.0.0.0 \
    EAD_PORT=8000 \
    EAD_BACKEND=auto \
    EAD_MODELS_ROOT=/models \
    EAD_LOG_FORMAT=json
# Model dirs and their engines/ (the TensorRT plan cache) live here; keep it on a volume.
VOLUME ["/models"]
WORKDIR /home/efficientad
USER 10001:10001
EXPOSE 8000
# The start period covers a first-start TensorRT build; failures inside it do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["efficientad-entrypoint", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["efficientad-entrypoint"]
CMD ["serve"]
