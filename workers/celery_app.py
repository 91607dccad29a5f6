"""The Celery app: JSON only, acks late, one queue per model, tasks sent by name.

Importing this module never imports torch: the producer uses it to send tasks.
"""

from __future__ import annotations

from celery import Celery

from recap.settings import Settings, get_settings

CAPTION_TASK = "recap.caption_chunk"


def queue_name(model: str) -> str:
    from producer.jobs import model_slug

    return f"recap.{model_slug(model)}"


def make_app(settings: Settings) -> Celery:
    app = Celery("recap", broker=settings.broker_url, include=["workers.tasks"])
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


app = make_app(get_settings())
