# A first working image for the cluster (CPU or GPU nodes: the tensorflow wheel carries both).
# The full GPU cluster image (CUDA libraries, Ray dashboard extras) comes later.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_USE_LEGACY_KERAS=1

RUN useradd --create-home --uid 1000 ray
WORKDIR /home/ray/app

# Dependencies first, so a code change does not reinstall TensorFlow and Ray.
COPY pyproject.toml README.md ./
RUN mkdir transfer jobs && touch transfer/__init__.py jobs/__init__.py \
    && pip install --no-cache-dir . \
    && rm -rf transfer jobs
COPY transfer ./transfer
COPY jobs ./jobs
RUN pip install --no-cache-dir --no-deps .

USER ray
ENTRYPOINT ["transfer-train"]
