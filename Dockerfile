# One image for all three services and the CLI:
#   docker run --rm aodm:local                               -> CLI help
#   docker run ... aodm:local python -m services.registry    -> a service
#   docker run ... aodm:local aodm demo                      -> the end-to-end demo
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AODM_LOG_FORMAT=json \
    AODM_HTTP_PORT=8080

WORKDIR /app

# Only what the package needs, so edits to tests/scripts/docs don't bust the cache.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY aodm ./aodm
RUN pip install '.[fast]' \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin aodm

USER aodm

# Health (/healthz, /readyz) and metrics (/metrics) of a service process.
EXPOSE 8080

CMD ["aodm", "--help"]
