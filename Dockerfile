# The cluster image: one image for the Ray head, the GPU workers and the job driver
# (KubeRay manifests in cluster/kuberay/, the AWS cluster launcher in cluster/launcher/).
#
#   docker build -t registry.example.com/transfer:0.1.0 .
#
# - TensorFlow 2.21 with its CUDA 12 and cuDNN 9 libraries as pip wheels (tensorflow[and-cuda]), so no CUDA base
#   image is needed: a GPU node needs only an NVIDIA driver for CUDA 12 (555 or newer recommended) and the NVIDIA
#   container runtime (Kubernetes: the NVIDIA device plugin). Without a GPU the same image runs on CPU.
# - tf-keras (Keras 2) with TF_USE_LEGACY_KERAS=1: Keras 3 fails under MultiWorkerMirroredStrategy.
# - Ray 2.60 with the dashboard and the job server (ray[default]): `ray job submit` and KubeRay's RayJob need them
#   on the head; ray[train] runs the workers.
# - User ray (uid 1000, group users gid 100, home /home/ray), as KubeRay and Ray's own images have it.
# - No ENTRYPOINT: KubeRay and the cluster launcher run `ray start ...` as the container's command.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TF_USE_LEGACY_KERAS=1

# For the cluster launcher (cluster/launcher/): it copies files into the container with `rsync -e 'docker exec -i'`,
# and the autoscaler on the head reaches the worker hosts with ssh and rsync. For KubeRay: operators that probe the
# pods with exec probes (older operators, or Ray before 2.53) run wget in them.
# tcmalloc: the input pipeline's short-lived image buffers cost glibc's malloc fresh pages from the kernel every
# time (a third of a worker's CPU, transfer/allocator.py); every process of the image preloads it (ENV below).
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client rsync wget libtcmalloc-minimal4 \
    && ln -s "/usr/lib/$(uname -m)-linux-gnu/libtcmalloc_minimal.so.4" /usr/local/lib/libtcmalloc_minimal.so.4 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --home-dir /home/ray --uid 1000 --gid 100 --shell /bin/bash ray

# The package's source (its example configs stay in /opt/transfer/jobs/configs/).
WORKDIR /opt/transfer

# Dependencies first, so a code change does not reinstall TensorFlow, CUDA and Ray. The package's own pins come
# from pyproject.toml; the GPU and dashboard extras are added here, in the same resolve, so exactly one TensorFlow
# distribution (`tensorflow`, which tf-keras requires) is installed.
COPY pyproject.toml README.md ./
RUN mkdir transfer jobs && touch transfer/__init__.py jobs/__init__.py \
    && pip install --no-cache-dir "tensorflow[and-cuda]==2.21.*" "ray[default,train]==2.60.*" . \
    && rm -rf transfer jobs build transfer.egg-info

COPY transfer ./transfer
COPY jobs ./jobs
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build transfer.egg-info \
    && python -I -c "import jobs.train, transfer.config, ray.train.tensorflow, tf_keras"

# Readiness is documented, not a Docker HEALTHCHECK: Kubernetes ignores HEALTHCHECK, and KubeRay probes each Ray
# pod's raylet and dashboard itself; `ray health-check` only works inside a running cluster, and importing
# TensorFlow every 30 s on every GPU node costs seconds of CPU for nothing. The import check above (-I: the
# installed package, not this folder) runs once, at build time, instead. See cluster/README.md ("Is it up?").
HEALTHCHECK NONE

ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4 \
    TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776

USER 1000:100
WORKDIR /home/ray
CMD ["transfer-train", "--help"]
