# syntax=docker/dockerfile:1
# CPU images of the service (docs/architecture.md §13), from one source tree:
#   target `api`        the API, `digin migrate`, `digin keys`, `digin reaper` (torch-free, small)
#   target `worker-cpu` a Celery worker on the CPU (docker-compose.cpu.yml), torch CPU build
# Every dependency is pinned by constraints.txt. The GPU worker is Dockerfile.gpu. The project is
# installed editable from /app because the Alembic migrations are read from the source tree
# (service/db/engine.py: MIGRATIONS).

FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DIGIN_DATA_DIR=/var/lib/digin
RUN useradd --create-home --uid 10001 digin \
    && mkdir -p /var/lib/digin && chown digin /var/lib/digin
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY client ./client
COPY api ./api
COPY service ./service
COPY core ./core
COPY worker ./worker
COPY digin ./digin
COPY migrations ./migrations

FROM base AS api
RUN pip install -c constraints.txt -e ./client -e .
USER digin
EXPOSE 8000
ENTRYPOINT ["digin"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker-cpu
RUN pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1 \
        --index-url https://download.pytorch.org/whl/cpu \
    && pip install -c constraints.txt -e ./client -e '.[core]'
ENV DIGIN_DEVICE=cpu \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch
RUN mkdir -p /models && chown digin /models
USER digin
EXPOSE 9808
ENTRYPOINT ["digin"]
CMD ["worker", "--queues", "interactive,sweep", "--concurrency", "1"]
