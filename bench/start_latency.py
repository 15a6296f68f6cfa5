"""Start's cost, as ratios against baselines measured in the same run.

Baselines: the gRPC floor (a Health/Check round trip on the same server and
channel) and raw Celery (`send_task` of the same task, the enqueue Start does).
Runs on an embedded Redis; no worker is needed (tasks are only enqueued).

    python bench/start_latency.py [--n 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.taskservice.v1 import task_service_pb2 as pb
from service._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from service.config import Settings
from service.embedded import EmbeddedRedis
from service.server import create_server


async def timed(n: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    for i in range(min(50, n)):  # warm up connections and pools
        await call(i)
    samples = []
    for i in range(n):
        began = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - began)
    return samples


def describe(name: str, samples: list[float], base: float) -> str:
    p50 = statistics.median(samples) * 1e6
    p99 = sorted(samples)[int(len(samples) * 0.99) - 1] * 1e6
    return f"{name:<34} p50 {p50:8.0f} µs   p99 {p99:8.0f} µs   x{p50 / base:5.2f}"


async def main(n: int) -> None:
    redis_server = EmbeddedRedis().start()
    settings = Settings(redis_url=redis_server.url, key_prefix=f"bench-{uuid.uuid4().hex[:6]}")
    running = await create_server(settings, port=0)
    from worker.app import create_publisher

    publisher = create_publisher(settings)
    loop = asyncio.get_running_loop()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.TaskServiceStub(channel)
            request = pb.StartRequest(task_name="demo.dummy", exclusivity_key="")
            request.kwargs.update({"seconds": 0})

            floor = await timed(n, lambda i: health.Check(health_pb2.HealthCheckRequest()))
            celery = await timed(
                n,
                lambda i: loop.run_in_executor(
                    None,
                    lambda: publisher.send_task("demo.dummy", kwargs={"seconds": 0}),
                ),
            )

            def keyed(i: int) -> pb.StartRequest:
                r = pb.StartRequest()
                r.CopyFrom(request)
                r.exclusivity_key = f"bench-{uuid.uuid4().hex}"
                return r

            # demo.dummy has the default key "demo": give each call a fresh one.
            start_keyed = await timed(n, lambda i: stub.Start(keyed(i)))
            status_id = (await stub.Start(keyed(n + 1))).task.id
            get_status = await timed(
                n, lambda i: stub.GetStatus(pb.GetStatusRequest(task_id=status_id))
            )
    finally:
        await running.stop(0)
        redis_server.stop()

    base = statistics.median(floor) * 1e6
    print(f"n={n} sequential calls, one client, loopback, embedded Redis")
    print(describe("gRPC floor (Health/Check)", floor, base))
    print(describe("raw Celery send_task (in executor)", celery, base))
    print(describe("GetStatus", get_status, base))
    print(describe("Start with exclusivity key", start_keyed, base))
    ratio = statistics.median(start_keyed) / statistics.median(celery)
    print(f"Start / raw send_task: x{ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    asyncio.run(main(parser.parse_args().n))
