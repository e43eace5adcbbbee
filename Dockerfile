# mocostream training image: CUDA + PyTorch + DALI, running as a non-root user (uid 1000).
#   docker build -t mocostream .
#   docker run --gpus all --shm-size=8g -p 9400:9400 \
#       -e AWS_ENDPOINT_URL -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       mocostream train --data s3://bucket/shards --steps 100000 --checkpoint-dir s3://bucket/ckpt --resume
#   several GPUs: docker run ... --entrypoint torchrun mocostream --nproc-per-node 8 -m mocostream.ops.cli train ...
# /dev/shm: the opencv backend's augmentation processes and NCCL pass tensors through shared memory, and
# Docker's default is 64 MB: give the container at least 8 GB (--shm-size, compose `shm_size`, or a
# memory-backed emptyDir mounted at /dev/shm on Kubernetes, see ops/k8s/).
# DALI's hardware JPEG decoder (nvJPEG on A100/H100) needs the driver's `video` capability, which the
# NVIDIA container runtime only mounts when asked: NVIDIA_DRIVER_CAPABILITIES below includes it.
# The CUDA user-space libraries come with the pinned torch and DALI wheels (DALI's cuda130 build matches
# the CUDA 13 base); the base image gives the CUDA container setup. Ubuntu 22.04 has Python 3.11 in universe.
FROM nvidia/cuda:13.0.1-base-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video

# Ubuntu's archive replaces package versions in place, so an apt pin would break the build; the
# Python dependencies, which decide behaviour, are pinned in pyproject.toml.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 mocostream && useradd --create-home --uid 1000 --gid 1000 mocostream
WORKDIR /opt/mocostream
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY moco_core ./moco_core
COPY shards ./shards
COPY curate ./curate
COPY ops ./ops
# The same install as the README's Quick start: the pinned dependencies come from pyproject.toml alone.
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH

# Numeric, so Kubernetes can enforce runAsNonRoot without resolving names.
USER 1000:1000
WORKDIR /home/mocostream
EXPOSE 9400
ENTRYPOINT ["mocostream"]
CMD ["--help"]
