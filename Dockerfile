# One image for both roles: `taskservice serve` (default) or `taskservice worker`.
# It listens on 0.0.0.0, so `serve` wants TLS or tokens (TASKSERVICE_TLS_*,
# TASKSERVICE_TOKENS[_FILE]) or an explicit TASKSERVICE_ALLOW_INSECURE=true;
# TASKSERVICE_TASKS names the task modules to expose.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    TASKSERVICE_HOST=0.0.0.0 TASKSERVICE_PORT=50051
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
RUN pip install --no-cache-dir . && useradd --system --no-create-home taskservice
USER taskservice
EXPOSE 50051
CMD ["taskservice", "serve"]
