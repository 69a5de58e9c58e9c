"""What the pipeline's own consumer costs per message, acking one at a time or in runs.

    python bench/consumer_ack_cost.py [--messages 5000] [--prefetch 100] [--rounds 2]

Publishes ``--messages`` JobRequested events to the processor's queue in a
throw-away vhost, then lets ``pipeline_shared.messaging``'s Consumer (the one
every service runs: decode, handler, settle) take them with a handler that
does nothing, and measures this process's CPU time and RabbitMQ's
(``beam.smp``) per message, and the rate. Two variants, alternated
``--rounds`` times: ``runs``, as the services run (``Settlements``: one
``basic.ack`` with ``multiple`` for a run of settled deliveries), and
``single``, with ``Settlements`` replaced by one ack per message as before.
All traffic stays on loopback; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from amqp_cost import beam_pid, cpu_of  # noqa: E402
from pipeline_shared.events import JobRequested  # noqa: E402
from pipeline_shared.messaging import Broker, acks, consumer  # noqa: E402
from pipeline_shared.topology import PROCESSOR  # noqa: E402
from support.rabbit import Management, new_vhost_name, url_for_vhost  # noqa: E402


class OneAckPerMessage(acks.Settlements):
    """What the consumer did before: each settlement written at once, alone."""

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await message.ack()

    async def nack(self, message: AbstractIncomingMessage) -> None:
        await message.nack(requeue=True)


async def one_round(url: str, messages: int, prefetch: int) -> tuple[float, float, float]:
    """(client µs, broker µs, messages/s) of consuming ``messages`` events."""
    broker = Broker(url, app_id="bench")
    await broker.connect()
    try:
        for n in range(messages):
            await broker.publish(
                JobRequested(job_id=uuid.uuid4(), email="ada@example.com", data={"n": n})
            )
        handled = 0
        finished = asyncio.Event()

        async def handler(event: JobRequested) -> None:
            nonlocal handled
            handled += 1
            if handled == messages:
                finished.set()

        beam = beam_pid()
        client, server, wall = time.process_time(), cpu_of(beam), time.perf_counter()
        taking = await broker.consume(PROCESSOR, JobRequested, handler, prefetch=prefetch)
        await asyncio.wait_for(finished.wait(), 300)
        await taking.stop(10)
        elapsed = time.perf_counter() - wall
        return (
            (time.process_time() - client) / messages * 1e6,
            (cpu_of(beam) - server) / messages * 1e6,
            messages / elapsed,
        )
    finally:
        await broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    management = Management.connect()
    print(f"load average at start: {Path('/proc/loadavg').read_text().strip()}")
    print(f"{args.messages} JobRequested, prefetch {args.prefetch}, a handler that does nothing")
    print(f"{'variant':<10} {'client µs/msg':>14} {'broker µs/msg':>14} {'msg/s':>8}")
    batched = acks.Settlements
    for _ in range(args.rounds):
        for name, settlements in (("single", OneAckPerMessage), ("runs", batched)):
            vhost = new_vhost_name("bench-acks")
            management.create_vhost(vhost)
            consumer.Settlements = settlements  # type: ignore[misc]
            try:
                client, server, rate = asyncio.run(
                    one_round(url_for_vhost(vhost), args.messages, args.prefetch)
                )
            finally:
                management.delete_vhost(vhost)
            print(f"{name:<10} {client:>14.0f} {server:>14.0f} {rate:>8.0f}")
    print(f"load average at end: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
