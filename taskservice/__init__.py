"""What task authors import, from one place.

On taskservice's own Celery app::

    from taskservice import TrackedTask, app, expose

    @expose(exclusivity_key="reports")
    @app.task(bind=True, base=TrackedTask, name="reports.build")
    def build(self: TrackedTask, month: str) -> dict[str, int]: ...

On your existing app (TASKSERVICE_CELERY_APP=proj.celery:app), keep your
app and base class and only add `expose`; `self.report_progress(...)` and
`self.cancel_requested()` are then available on the task too::

    from taskservice import expose

    @expose()
    @proj_app.task(bind=True, name="reports.build")
    def build(self, month: str) -> dict[str, int]: ...
"""

from worker.app import app, expose
from worker.signals import Tracked, TrackedTask

__all__ = ["Tracked", "TrackedTask", "app", "expose"]
