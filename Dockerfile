# The image for worker, beat and flower. CUDA torch comes from PyPI's default wheels.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY lorabatch ./lorabatch
RUN pip install --no-cache-dir '.[worker,postgres,annotate]' flower
ENTRYPOINT []
