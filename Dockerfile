# One image for both roles: `taskservice serve` (default) or `taskservice worker`.
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
