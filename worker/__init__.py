"""The Celery side (installed as taskservice.worker): the app, its tasks and the
hooks that report back."""
