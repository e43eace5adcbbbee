# mocostream training image: CUDA + PyTorch + DALI, running as a non-root user.
#   docker build -t mocostream .
#   docker run --gpus all --shm-size=8g -e AWS_ENDPOINT_URL -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       mocostream train --data s3://bucket/shards --steps 100000 --checkpoint-dir s3://bucket/ckpt
# /dev/shm: the torch backend's worker processes and NCCL use shared memory; give the container
# at least 8 GB (--shm-size, or a memory-backed emptyDir on Kubernetes).
# DALI's hardware JPEG decoder needs the driver's `video` capability (set below).
# The CUDA user-space libraries come with the pinned torch and DALI wheels; the base gives the CUDA
# container setup. Ubuntu 22.04 has Python 3.11 in universe.
FROM nvidia/cuda:13.0.1-base-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 mocostream
WORKDIR /opt/mocostream
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY moco_core ./moco_core
COPY shards ./shards
COPY ops ./ops
# The same install as the README: the pinned dependencies come from pyproject.toml alone.
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH

USER mocostream
WORKDIR /home/mocostream
EXPOSE 9400
ENTRYPOINT ["mocostream"]
CMD ["--help"]
