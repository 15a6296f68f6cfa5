"""What the Sentinel settings make of Celery's, kombu's and redis-py's
configuration: every part reaches the records' master set the same way."""

from __future__ import annotations

import pytest
from celery import Celery
from pydantic import ValidationError

from taskservice import apps
from taskservice.core import connect
from taskservice.core.settings import Settings
from taskservice.server.publisher import Publisher, create_publisher

SENTINELS = "10.0.0.1:26379, 10.0.0.2:26380,[::1]:26381"


def sentinel_settings(**more: object) -> Settings:
    return Settings(
        redis_url="redis://user:s%40cret@ignored:6379/2",
        redis_sentinels=SENTINELS,
        redis_sentinel_master="records",
        **more,  # type: ignore[arg-type]
    )


def test_the_broker_and_result_backend_default_to_the_sentinels_with_credentials_and_database() -> (
    None
):
    settings = sentinel_settings()
    expected = (
        "sentinel://user:s%40cret@10.0.0.1:26379/2;sentinel://user:s%40cret@10.0.0.2:26380/2;"
        "sentinel://user:s%40cret@[::1]:26381/2"
    )
    assert settings.records_celery_url == expected
    assert settings.effective_broker_url == expected
    assert settings.effective_result_backend == expected
    assert settings.sentinel_addresses == (
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26380),
        ("::1", 26381),
    )


def test_celery_gets_the_sentinel_transport_with_the_fix_and_the_master_name() -> None:
    config = apps.celery_config(sentinel_settings(redis_sentinel_password="sp"))
    assert config["broker_transport"] == apps.SENTINEL_TRANSPORT
    assert config["broker_channel_error_retry"] is True  # READONLY reconnects
    options = config["broker_transport_options"]
    assert options["master_name"] == "records"
    assert options["sentinel_kwargs"]["password"] == "sp"
    assert options["socket_timeout"] > 0  # kept from the plain Redis options
    assert config["result_backend_transport_options"]["master_name"] == "records"


def test_a_broker_of_its_own_keeps_its_transport() -> None:
    config = apps.celery_config(sentinel_settings(broker_url="amqp://guest@localhost//"))
    assert "broker_transport" not in config
    assert config["result_backend"].startswith("sentinel://")


def test_redis_py_clients_connect_to_the_master_with_the_url_credentials() -> None:
    settings = sentinel_settings(redis_sentinel_password="sp")
    assert connect.master_options(settings) == {"db": 2, "password": "s@cret", "username": "user"}
    assert connect.sentinel_options(settings)["password"] == "sp"
    client = connect.client(settings, decode_responses=True)  # connects lazily
    pool = client.connection_pool
    assert pool.service_name == "records"  # type: ignore[attr-defined]
    assert pool.connection_kwargs["db"] == 2
    client.close()


def test_starts_push_with_their_claim_only_when_the_broker_is_the_same_master_set() -> None:
    settings = sentinel_settings()
    ours = Celery("ours", set_as_current=False)
    apps.configure(ours, settings)
    publisher = Publisher(create_publisher(settings, ours), settings)
    other = sentinel_settings(broker_url="redis://elsewhere:6379/0")
    theirs = Celery("theirs", set_as_current=False)
    apps.configure(theirs, other)
    not_same = Publisher(create_publisher(other, theirs), other)
    try:
        assert publisher.direct
        assert not not_same.direct
    finally:
        publisher.close()
        not_same.close()


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"redis_sentinels": "h:1"}, "set together"),
        ({"redis_sentinel_master": "m"}, "set together"),
        (
            {"redis_sentinels": "h:1", "redis_sentinel_master": "m", "redis_url": "rediss://h/0"},
            "TLS",
        ),
        ({"redis_sentinels": "h:x", "redis_sentinel_master": "m"}, "no host:port"),
        ({"redis_min_replicas": 1, "redis_min_replicas_timeout": 2.0}, "below redis_timeout"),
    ],
)
def test_inconsistent_sentinel_settings_are_refused(
    settings: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ValidationError, match=complaint):
        Settings(**settings)  # type: ignore[arg-type]
