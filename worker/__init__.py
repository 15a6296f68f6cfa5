"""The Celery side of taskservice: the app, its tasks and the hooks that report back."""
