"""taskservice: a gRPC front door for Celery."""
