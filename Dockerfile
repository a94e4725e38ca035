# The image for worker, beat and flower. CUDA torch comes from PyPI's default wheels.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY client ./client
COPY schemas ./schemas
COPY store ./store
COPY producer ./producer
COPY worker ./worker
COPY demo ./demo
COPY cli ./cli
RUN pip install --no-cache-dir '.[worker,postgres,annotate]' flower
ENTRYPOINT []
