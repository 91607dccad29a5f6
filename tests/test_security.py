"""Secure defaults: JSON-only Celery, TLS URLs pass through, secrets stay out of output,
the private-address guard is on unless an operator opens it."""

from __future__ import annotations

from recap.db import normalise_url, safe_url
from recap.queue import make_app
from recap.settings import Settings


def test_celery_accepts_json_only_and_acks_late():
    conf = make_app(Settings()).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1


def test_tls_urls_pass_through_the_settings(monkeypatch):
    monkeypatch.setenv("RECAP_BROKER_URL", "rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required")
    monkeypatch.setenv("RECAP_DATABASE_URL", "postgresql://u:pw@db.example/recap?sslmode=verify-full")
    settings = Settings()
    assert make_app(settings).conf.broker_url == "rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required"
    url = normalise_url(settings.database_url)
    assert url.startswith("postgresql+psycopg://") and "sslmode=verify-full" in url


def test_passwords_are_masked_for_output():
    assert "pw" not in safe_url("postgresql://u:pw@db.example/recap").replace("postgresql", "")
    assert "***" in safe_url("postgresql://u:pw@db.example/recap")


def test_the_private_address_guard_is_on_by_default(monkeypatch):
    monkeypatch.delenv("RECAP_FETCH_ALLOW_CIDRS", raising=False)
    assert Settings().fetch_allow_cidrs == []
    assert Settings().flower_password is None
    assert "recap" in Settings().user_agent
