# The proxy and the llama.cpp upstream share this image (docker-compose.yml).
# scripts/install.sh builds llama-cpp-python from source with AMX off and
# installs the CPU torch wheel; the demo offset is trained on first start
# and cached in the volume mounted at /root/.cache/deltaproxy.
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY scripts scripts
COPY proxy proxy
COPY adapters adapters
COPY bench bench
COPY deploy deploy
RUN bash scripts/install.sh
ENV PATH=/app/.venv/bin:$PATH PYTHON=/app/.venv/bin/python
EXPOSE 8000 8080
CMD ["deltaproxy", "serve", "--config", "deploy/proxy.toml"]
