# recap producer and control image: `recap submit`, `status`, `retry`, `reconcile`,
# `export`, `db upgrade`, `flower`. The base distribution only: no torch, no transformers
# (the producer and the CLI root never import them), so it is small and needs no GPU.
#
# Build from the repository root (the build context):
#   docker build -f docker/producer.Dockerfile -t recap-producer .
# Use:
#   docker run --rm -e RECAP_DATABASE_URL=... -e RECAP_BROKER_URL=... \
#     -v "$PWD/data:/data:ro" recap-producer submit /data/urls.parquet --job example

FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The package alone (no extras): psycopg, celery, flower, pyarrow... all as wheels.
COPY . /tmp/recap-src
RUN pip install --no-cache-dir /tmp/recap-src \
 && rm -rf /tmp/recap-src \
 && recap --help >/dev/null

# A non-root user (numeric, so Kubernetes' runAsNonRoot can check it).
RUN groupadd --system --gid 10001 recap \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/recap --shell /usr/sbin/nologin recap
USER 10001:10001
WORKDIR /home/recap

ENTRYPOINT ["recap"]
CMD ["--help"]
