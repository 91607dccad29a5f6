# recap GPU worker: `recap worker --gpus all` starts one Celery worker process per GPU.
#
# Build from the repository root (the build context):
#   docker build -f docker/worker.Dockerfile -t recap-worker .
# Run on a host with the NVIDIA Container Toolkit (or use docker/compose.yaml):
#   docker run -d --gpus all --init --stop-timeout 60 \
#     -e RECAP_DATABASE_URL=... -e RECAP_BROKER_URL=... -v recap-models:/models recap-worker
#
# CUDA: torch's CUDA wheels carry their own CUDA libraries (cuBLAS, cuDNN, NCCL), so the
# base image needs only the CUDA "base" flavour: it sets what the NVIDIA runtime reads
# (driver capabilities, the required CUDA version) and nothing is installed twice.
# torch 2.13 is built for CUDA 12.6 and 13.0; the default (13.0) needs an NVIDIA driver
# 580 or newer. For an older driver (525 or newer) build the CUDA 12.6 variant:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#
# The vLLM caption engine (README, "Choosing the engine"): --build-arg ENGINE=vllm adds
# recap's vllm extra. vLLM pins its torch (0.33: torch 2.14.0), so build it with that torch:
#   docker build -f docker/worker.Dockerfile --build-arg ENGINE=vllm \
#     --build-arg TORCH_VERSION=2.14.0 -t recap-worker:vllm .
# (another TORCH_VERSION still builds, but pip then downloads vLLM's torch over it). The
# image is about 3 GB larger; RECAP_ENGINE=auto (the default) then captions LLaVA-1.5 and
# LLaVA-NeXT models with vLLM and Llama 3.2 Vision with transformers.
#
# Pillow-SIMD (AVX2) replaces Pillow: it resizes every image about 5x faster on the CPU
# (README, performance). It needs a CPU with AVX2, as every x86-64 server CPU since 2015
# has; --build-arg PILLOW_SIMD=0 keeps plain Pillow.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG PILLOW_SIMD=1

# -- Pillow-SIMD, built in a stage of its own: the compiler and headers stay out of the image.
FROM ${CUDA_IMAGE} AS pillow-simd
ARG PILLOW_SIMD
ARG PILLOW_SIMD_VERSION=12.1.1.post0
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN mkdir /wheels \
 && if [ "${PILLOW_SIMD}" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates gcc pkg-config python3.12-dev python3.12-venv \
           libjpeg-turbo8-dev zlib1g-dev libwebp-dev libtiff-dev libavif-dev \
      && rm -rf /var/lib/apt/lists/* \
      && python3.12 -m venv /opt/build \
      && CC="gcc -mavx2" /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-binary pillow-simd \
           --wheel-dir /wheels "pillow-simd==${PILLOW_SIMD_VERSION}"; \
    fi

# -- the worker image
FROM ${CUDA_IMAGE}
ARG PILLOW_SIMD
# transformers (the engine every image has), or vllm (the vLLM engine as well)
ARG ENGINE=transformers

# torch within the project's range (torch>=2.3,<2.15), from PyTorch's CUDA index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

# nvidia-smi (the "utility" capability) lists the GPUs for `--gpus all`; "compute" runs
# the model. Model weights (HF_HOME) and recap's own cache live in the /models volume.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/models \
    RECAP_CACHE_DIR=/models/recap

# Ubuntu 24.04's Python 3.12 (the project needs 3.11 or newer), in a virtual environment.
# libjpeg-turbo, libwebp, libtiff and libavif: what the Pillow-SIMD wheel links to.
# Versions come from the pinned base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3.12 python3.12-venv \
      libjpeg-turbo8 libwebp7 libwebpmux3 libwebpdemux2 libtiff6 libavif16 \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv

# torch first, in a layer of its own: the largest one, and it changes least often.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The package with its worker extra (transformers, tokenizers); the torch above satisfies
# the extra's torch requirement and is kept. No torchvision: transformers uses its PIL
# image processors without it, and a torchvision not built for this torch breaks imports.
# ENGINE=vllm: the vllm extra too (vLLM brings the torchvision built for its torch).
COPY . /tmp/recap-src
RUN pip install --no-cache-dir "/tmp/recap-src[worker]" \
 && if [ "${ENGINE}" = vllm ]; then \
      pip install --no-cache-dir "/tmp/recap-src[worker,vllm]" && python -c "import vllm; print('vllm', vllm.__version__)"; \
    fi \
 && rm -rf /tmp/recap-src \
 && python -c "import torch, transformers, recap, workers; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The same `PIL` package, other distribution name: pip cannot see that it satisfies
# recap's "pillow" requirement, hence --no-deps after removing Pillow.
COPY --from=pillow-simd /wheels /tmp/wheels
RUN if [ "${PILLOW_SIMD}" = 1 ]; then \
      pip uninstall -y pillow && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl; \
    fi \
 && rm -rf /tmp/wheels \
 && python -c "from workers.prepare import missing_codecs as m, pillow_build as b; print('images prepared with', b()); assert not m(), f'Pillow lacks {m()}'"

COPY docker/healthcheck.py /opt/recap/healthcheck.py

# A non-root user (numeric, so Kubernetes' runAsNonRoot can check it); it owns the cache.
RUN groupadd --system --gid 10001 recap \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/recap --shell /usr/sbin/nologin recap \
 && mkdir -p /models/recap \
 && chown -R 10001:10001 /models
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/recap

# Healthy while every Celery node of this container answers a ping (docker/healthcheck.py).
# The model loads on the first chunk, not at start, so the start period is short.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
  CMD ["python", "/opt/recap/healthcheck.py", "--timeout", "5"]

# SIGTERM: `recap worker` passes it to its Celery workers, which shut down warm (they finish
# what they hold, then exit). Give the container a stop grace period that covers at least
# one batch on the GPU (compose: stop_grace_period: 60s; docker run/stop: --stop-timeout /
# --time 60; Kubernetes: terminationGracePeriodSeconds). Past it the worker is killed and
# its chunk is re-run once its lease runs out: nothing is lost, only time.
STOPSIGNAL SIGTERM
ENTRYPOINT ["recap", "worker"]
CMD ["--gpus", "all"]
