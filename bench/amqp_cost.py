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

``three_hops`` (used by ``suite.py``, ``make bench``) is the broker's ceiling for
the pipeline: a bare aio-pika program doing a job's three hops, each stage in a
process of its own as the services are: publish to a first queue (confirmed,
``--window`` in flight), a stage consuming it and republishing to a second
queue (its own confirm awaited before the ack), a second such stage, and a
last consumer acking. Persistent messages to quorum queues throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
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


HOPS = ("bench.hop1", "bench.hop2", "bench.hop3")


def _persistent(n: int) -> aio_pika.Message:
    return aio_pika.Message(
        BODY,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(n),
        type="DataProcessed",
        app_id="bench",
    )


async def _relay(url: str, source: str, target: str | None, count: int, prefetch: int) -> None:
    """Consume ``count`` messages from ``source``; republish each to ``target`` (its
    confirm awaited) before acking it, as a service's handler does."""
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(source, ensure=False)
        done = asyncio.Event()
        handled = 0
        in_flight: set[asyncio.Task[None]] = set()

        async def handle(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal handled
            if target is not None:
                await channel.default_exchange.publish(
                    _persistent(handled), target, mandatory=True, timeout=10
                )
            await incoming.ack()
            handled += 1
            if handled >= count:
                done.set()

        async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            # Every delivery handled at once, up to the prefetch, as the services do.
            task = asyncio.create_task(handle(incoming))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

        await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=600)


def _relay_process(url: str, source: str, target: str | None, count: int, prefetch: int) -> None:
    asyncio.run(_relay(url, source, target, count, prefetch))


@dataclass(frozen=True)
class Ceiling:
    messages: int
    wall_s: float
    broker_s: float

    @property
    def per_second(self) -> float:
        return self.messages / self.wall_s


async def _declare(url: str) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        for name in HOPS:
            await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


async def _publish_all(url: str, messages: int, window: int) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        for start in range(0, messages, window):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        _persistent(n), HOPS[0], mandatory=True, timeout=10
                    )
                    for n in range(start, min(start + window, messages))
                )
            )


def three_hops(
    management: Management,
    vhost: str,
    messages: int = 5000,
    window: int = 64,
    prefetch: int = 32,
) -> Ceiling:
    """Messages per second through three confirmed, persistent hops (see the module's
    docstring), each stage a process, in ``vhost`` (which the caller owns)."""
    url = url_for_vhost(vhost)
    asyncio.run(_declare(url))
    spawn = multiprocessing.get_context("spawn")
    stages = [
        spawn.Process(target=_relay_process, args=(url, HOPS[0], HOPS[1], messages, prefetch)),
        spawn.Process(target=_relay_process, args=(url, HOPS[1], HOPS[2], messages, prefetch)),
        spawn.Process(target=_relay_process, args=(url, HOPS[2], None, messages, prefetch)),
    ]
    for stage in stages:
        stage.start()
    try:
        deadline = time.monotonic() + 60
        while any(management.consumers(vhost, name) < 1 for name in HOPS):
            if time.monotonic() > deadline or not all(s.is_alive() for s in stages):
                raise RuntimeError("the three-hop stages did not start consuming")
            time.sleep(0.1)
        beam = beam_pid()
        broker, wall = cpu_of(beam), time.perf_counter()
        asyncio.run(_publish_all(url, messages, window))
        for stage in stages:
            stage.join(timeout=600)
        return Ceiling(messages, time.perf_counter() - wall, cpu_of(beam) - broker)
    finally:
        for stage in stages:
            if stage.is_alive():
                stage.terminate()
                stage.join(timeout=10)


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
