"""Celery configurations of team apps whose broker is the records' own Redis,
in the ways that make kombu put a task message somewhere other than the plain
list named after its queue (tests/integration/test_publish.py)."""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

CONFIGS: dict[str, dict[str, Any]] = {
    # kombu prefixes every key: the worker reads proj:pub-prefixed.
    "prefixed": {
        "broker_transport_options": {"global_keyprefix": "proj:"},
        "task_default_queue": "pub-prefixed",
    },
    "routed": {
        # Priorities 3-9 go to lists of their own (queue + "\x06\x16" + step).
        "broker_transport_options": {"queue_order_strategy": "priority"},
        "task_default_priority": 1,  # step 0: still the plain list
        "task_default_queue": "pub-default",
        "task_queues": [
            Queue("pub-default"),
            Queue("pub-routed"),
            Queue("pub-x", Exchange("x-ex"), routing_key="x-rk"),
            Queue("pub-hipri", Exchange("hipri-x"), routing_key="hi"),
        ],
        "task_routes": {
            "pub.routed": {"queue": "pub-routed"},
            "pub.own_exchange": {"queue": "pub-x"},
            # kombu looks the exchange up in _kombu.binding.hipri-x: pub-hipri.
            "pub.by_exchange": {"exchange": "hipri-x", "routing_key": "hi"},
        },
    },
}

QUEUES = {"prefixed": "pub-prefixed", "routed": "pub-default,pub-routed,pub-x,pub-hipri"}
"""What each configuration's worker consumes."""
