"""Fixtures of the unit tests that play the server for a client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.testing_channel import testing_channel


@pytest.fixture
def channel() -> Any:
    """grpcio-testing's channel: the test takes and answers each call."""
    return testing_channel()


@pytest.fixture
def call() -> Iterator[Callable[..., Future[Any]]]:
    """Runs a client call in a thread while the test answers it."""
    with ThreadPoolExecutor(1) as pool:
        yield lambda function, *args, **kwargs: pool.submit(function, *args, **kwargs)
