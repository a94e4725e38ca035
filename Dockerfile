# Two images from one file, each running as the user `lorabatch` (never root):
#   --target producer  submit, status, beat, metrics, flower: the producer install, no torch
#   --target worker    the GPU worker: the worker extra (CUDA torch from PyPI's default wheels)
# Installed with -c constraints.txt: the versions the project is tested with, flower included (only
# the CUDA libraries torch pulls are left to torch's own pins).
# UID: the user's id; make it the owner of the host folder mounted for data (docker-compose.yml
# passes LORABATCH_UID, default 1000), so annotation outputs can be written there.
FROM python:3.11-slim AS base
ARG UID=1000
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid "${UID}" --user-group lorabatch \
    && mkdir -p /cache/huggingface /deploy \
    && chown lorabatch:lorabatch /cache/huggingface
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY client ./client
COPY schemas ./schemas
COPY store ./store
COPY producer ./producer
COPY worker ./worker
COPY demo ./demo
COPY cli ./cli
ENTRYPOINT []

FROM base AS producer
RUN pip install -c constraints.txt '.[postgres,annotate]' flower
USER lorabatch

FROM base AS worker
RUN pip install -c constraints.txt '.[worker,postgres,annotate]'
USER lorabatch
