# The image for worker, beat and flower. CUDA torch comes from PyPI's default wheels.
# Installed with -c constraints.txt: the versions the project is tested with, flower included (only
# the CUDA libraries torch pulls are left to torch's own pins).
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
RUN pip install --no-cache-dir -c constraints.txt '.[worker,postgres,annotate]' flower
ENTRYPOINT []
