"""The queue contract producer and workers share: the task's name, one queue per model,
and the Celery app's configuration (JSON only, acks late, no result backend).

The producer sends tasks by name through `app`; workers build their own app with the
same configuration plus the module that defines the task (`workers.celery_app`).
Importing this module never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from recap.models import model_slug
from recap.settings import Settings, get_settings

CAPTION_TASK = "recap.caption_chunk"


def queue_name(model: str) -> str:
    """The Redis list a model's chunks wait in (`recap.<model-slug>`)."""
    return f"recap.{model_slug(model)}"


def make_app(settings: Settings, include: Sequence[str] = ()) -> Celery:
    app = Celery("recap", broker=settings.broker_url, include=list(include))
    app.conf.update(
        # Never pickle: a message is data, not code.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        # No result backend: Postgres holds every result.
        task_ignore_result=True,
        result_backend=None,
        # A dead child's message goes back to the queue; one message at a time per child.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Longer than the longest chunk, or a running chunk is delivered a second time.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Flower needs events.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=queue_name(settings.model),
        worker_hijack_root_logger=False,
        # Loading the model happens on the first task, not at child start (4 s limit).
        worker_proc_alive_timeout=60,
    )
    return app


_producer_app: Celery | None = None


def producer_app() -> Celery:
    """The app the producer sends tasks with (built once per process)."""
    global _producer_app
    if _producer_app is None:
        _producer_app = make_app(get_settings())
    return _producer_app
