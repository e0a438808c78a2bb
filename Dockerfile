# The image every RECO service runs: the `reco` CLI, the Celery workers and the migrations.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install .
RUN useradd --create-home --uid 1000 reco && mkdir -p /data && chown reco /data
USER reco
CMD ["reco", "info"]
