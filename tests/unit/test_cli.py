"""The command line hands unknown worker options to Celery, and rejects them elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from service import cli


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
