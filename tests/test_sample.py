"""`make run` (scripts/run-sample.sh), the newcomer's first command, fails clearly when it
cannot work. CI runs the whole of it as the README says (.ci/run)."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.support.fleet import REPO

INSTALLED = REPO / ".venv" / ".recap-installed"  # written by scripts/setup-venv.sh


@pytest.mark.skipif(not INSTALLED.exists(), reason="needs the .venv that scripts/setup-venv.sh makes")
def test_make_run_refuses_a_taken_port_before_captioning_anything(tmp_path):
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", 8765))
            holder.listen()
        except OSError:
            pass  # something else holds it: the script must refuse all the same
        result = subprocess.run(
            ["bash", str(REPO / "scripts" / "run-sample.sh")],
            capture_output=True,
            text=True,
            timeout=300,
            env={"PATH": "/usr/bin:/bin", "RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/sample.db"},
            cwd=REPO,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "port 8765" in result.stderr and "is taken" in result.stderr
    assert not (tmp_path / "sample.db").exists()
