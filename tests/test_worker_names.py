"""Worker names are built and parsed in one place, and keep the spellings deploy files,
the health check and people reading `recap status` know."""

from __future__ import annotations

import os
import socket

from recap.worker_names import WORKER_NAME_ENV, CeleryNode, FleetOwner, LocalOwner, node_name


def test_celery_node_names():
    assert str(CeleryNode("0", 41, "box")) == "recap-gpu0-41@box"
    assert node_name("3", 7, "gpu-host.example") == "recap-gpu3-7@gpu-host.example"
    assert node_name(None, 7, "box") == "recap-cpu-7@box"


def test_the_launcher_hands_each_worker_its_node_name_as_its_lease_owner(monkeypatch):
    from recap.settings import Settings
    from workers.daemon import worker_specs

    (spec,) = worker_specs(["1"], Settings())
    assert spec.node_name == f"recap-gpu1-{os.getpid()}@{socket.gethostname()}"
    monkeypatch.setenv(WORKER_NAME_ENV, spec.env({})[WORKER_NAME_ENV])
    assert str(FleetOwner.this_process()) == f"{spec.node_name}:{os.getpid()}"
    monkeypatch.delenv(WORKER_NAME_ENV)
    assert str(FleetOwner.this_process()) == f"recap-{socket.gethostname()}:{os.getpid()}"


def test_local_owners_round_trip_and_only_dead_local_processes_are_gone():
    me = LocalOwner.this_process()
    assert str(me) == f"recap-local-{os.getpid()}@{socket.gethostname()}"
    assert LocalOwner.parse(str(me)) == me
    assert LocalOwner.parse("recap-gpu0-1@host:7") is None and LocalOwner.parse(None) is None
    assert not me.is_gone()
    assert not LocalOwner(2**22 + 1, "another-host").is_gone()  # not ours to judge
