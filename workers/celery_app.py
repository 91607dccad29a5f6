"""The workers' Celery app: the shared queue contract (`recap.queue`) plus the task module.

`celery -A workers.celery_app worker` and `flower` load this module.
"""

from __future__ import annotations

from recap.queue import make_app
from recap.settings import get_settings

app = make_app(get_settings(), include=["workers.tasks"])
