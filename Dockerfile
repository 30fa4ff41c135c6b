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

# The services' dependencies at their exact versions, in a layer of their own (rebuilt only
# when the lock changes). The lock is complete, so nothing else is resolved.
COPY requirements/server.lock ./requirements/
RUN pip install --no-deps -r requirements/server.lock && pip check

# The client package and its `aodm` command, on the locked versions above. The services run
# from the source tree in /app (`python -m services.registry`, the working directory).
COPY pyproject.toml README.md ./
COPY aodm ./aodm
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin aodm
COPY shared ./shared
COPY services ./services

USER aodm

# Health (/healthz, /readyz) and metrics (/metrics) of a service process.
EXPOSE 8080

CMD ["aodm", "--help"]
