"""What one AMQP message costs the client and the broker, one at a time and batched.

    python bench/amqp_cost.py [--messages 3000] [--window 64]

Every service pays, per job, a confirmed persistent publish to a quorum queue
and a delivery with its own ack. This measures, with the services' client
(aio-pika, one robust connection, a confirming channel, ``mandatory``
publishes to a topic exchange bound to one quorum queue, messages the size of
a ``DataProcessed``), in a throw-away vhost on the machine's RabbitMQ:

* publishing with each confirm awaited before the next publish (what a
  handler does today, one job at a time) and with ``--window`` publishes in
  flight, each still awaiting its own confirm (pipelined confirms);
* consuming with prefetch 32 and one ``ack`` per message (today), and with
  prefetch ``2 * --window`` and one ``ack(multiple=True)`` per ``--window``
  messages (batched acks).

For each, per message: this process's CPU time (client), RabbitMQ's CPU time
(``beam.smp``, from ``/proc``; anything else the broker does meanwhile is
included) and the rate. All traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.rabbit import Management, new_vhost_name, url_for_vhost

HERTZ = os.sysconf("SC_CLK_TCK")
BODY = b'{"event_type":"DataProcessed","schema_version":1,' + b'"x":"' + b"a" * 400 + b'"}'


def beam_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    return None


def cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    values = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(values[11]) + int(values[12])) / HERTZ


@dataclass(frozen=True)
class Result:
    name: str
    messages: int
    client_s: float
    broker_s: float
    wall_s: float

    def line(self) -> str:
        per = self.messages
        return (
            f"{self.name:<58} {1e6 * self.client_s / per:9.0f} {1e6 * self.broker_s / per:9.0f} "
            f"{per / self.wall_s:9.0f}"
        )


async def timed(name: str, messages: int, work: Callable[[], Awaitable[None]]) -> Result:
    beam = beam_pid()
    client, broker, wall = time.process_time(), cpu_of(beam), time.perf_counter()
    await work()
    return Result(
        name,
        messages,
        time.process_time() - client,
        cpu_of(beam) - broker,
        time.perf_counter() - wall,
    )


async def run(url: str, messages: int, window: int) -> list[Result]:
    connection = await aio_pika.connect_robust(url)
    results = []
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            "bench.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            "bench.work", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, "data.processed")

        def message(n: int) -> aio_pika.Message:
            return aio_pika.Message(
                BODY,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(n),
                correlation_id=str(n),
                type="DataProcessed",
                app_id="bench",
            )

        async def publish_one_at_a_time() -> None:
            for n in range(messages):
                await exchange.publish(message(n), "data.processed", mandatory=True, timeout=10)

        async def publish_pipelined() -> None:
            for start in range(0, messages, window):
                await asyncio.gather(
                    *(
                        exchange.publish(message(n), "data.processed", mandatory=True, timeout=10)
                        for n in range(start, min(start + window, messages))
                    )
                )

        async def consume(prefetch: int, ack_every: int) -> None:
            consuming = await connection.channel()
            await consuming.set_qos(prefetch_count=prefetch)
            work_queue = await consuming.get_queue("bench.work", ensure=False)
            done = asyncio.Event()
            received = 0

            async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal received
                received += 1
                if ack_every == 1:
                    await incoming.ack()
                elif received % ack_every == 0 or received == messages:
                    await incoming.ack(multiple=True)
                if received == messages:
                    done.set()

            tag = await work_queue.consume(on_message)
            await asyncio.wait_for(done.wait(), timeout=120)
            await work_queue.cancel(tag)
            await consuming.close()

        results.append(
            await timed("publish, each confirm awaited in turn", messages, publish_one_at_a_time)
        )
        results.append(
            await timed(
                "consume, prefetch 32, one ack per message",
                messages,
                lambda: consume(32, 1),
            )
        )
        results.append(
            await timed(
                f"publish, {window} in flight (pipelined confirms)",
                messages,
                publish_pipelined,
            )
        )
        results.append(
            await timed(
                f"consume, prefetch {2 * window}, ack(multiple=True) every {window}",
                messages,
                lambda: consume(2 * window, window),
            )
        )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args(argv)
    management = Management.connect()
    vhost = new_vhost_name("bench-amqp")
    management.create_vhost(vhost)
    try:
        print(f"load average at start: {Path('/proc/loadavg').read_text().strip()}")
        print(f"{len(BODY)}-byte persistent messages to a quorum queue, {args.messages} each way")
        print(f"{'per message':<58} {'client µs':>9} {'broker µs':>9} {'msg/s':>9}")
        for result in asyncio.run(run(url_for_vhost(vhost), args.messages, args.window)):
            print(result.line(), flush=True)
        print(f"load average at end: {Path('/proc/loadavg').read_text().strip()}")
    finally:
        management.delete_vhost(vhost)
        management.close()


if __name__ == "__main__":
    main()
