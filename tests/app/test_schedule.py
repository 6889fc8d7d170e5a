"""The weekly refresh schedule (APScheduler cron) and its settings."""

import json
from datetime import datetime
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from app.audit import AuditLog
from app.worker import start_scheduler
from ingestion.ledger import Ledger
from tests.app.conftest import make_settings


def test_default_schedule_is_sundays_at_three_and_a_tick_queues_one_refresh(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    woken = []
    audit = AuditLog(tmp_path / "audit.jsonl", actor={"kind": "service"})
    services = SimpleNamespace(settings=make_settings(tmp_path), ledger=ledger, wake_workers=lambda: woken.append(1),
                               audit=audit)
    scheduler = start_scheduler(services)
    try:
        job = scheduler.get_job("weekly-refresh")
        fire = job.trigger.get_next_fire_time(None, datetime.now(job.trigger.timezone))
        assert (fire.weekday(), fire.hour, fire.minute) == (6, 3, 0)
        job.func()
        job.func()  # a refresh is already queued: the second tick adds nothing
    finally:
        scheduler.shutdown(wait=False)
    assert [j.kind for j in ledger.unfinished_jobs(("refresh", "rollback"))] == ["refresh"]
    assert woken == [1]
    ledger.close()
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["actor"], e["outcome"]) for e in lines] == [
        ("refresh_requested", {"kind": "schedule", "cron": "0 3 * * sun"}, "accepted"),
        ("refresh_requested", {"kind": "schedule", "cron": "0 3 * * sun"}, "already_active")]


def test_empty_cron_disables_and_bad_values_are_refused(tmp_path):
    assert start_scheduler(SimpleNamespace(settings=make_settings(tmp_path, refresh_cron=""))) is None
    with pytest.raises(ValidationError, match="refresh_cron"):
        make_settings(tmp_path, refresh_cron="every sunday")
    with pytest.raises(ValidationError, match="refresh_timezone"):
        make_settings(tmp_path, refresh_timezone="Mars/Olympus")
