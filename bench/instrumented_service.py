"""Run one service's console command with counters on its hot path (bench only).

    python bench/instrumented_service.py --counts-dir DIR .venv/bin/api-service

Before the service's own code runs, this wraps (by monkeypatching, nothing in
the services changes) the calls whose number per job ``profile_services.py
--mode count`` reports: JSON encodes and decodes, pydantic validations and
dumps (by model), the input contract's walk and checks, SQL transactions (by
kind and by the store method that opened them) and statements, thread hops
(``asyncio.to_thread``, executors, the mailer's daemon pool, AnyIO's thread
pool), confirmed publishes (and how long each waited for its confirm), acks,
and log records. Each counter also sums the thread CPU time (``time.thread_time``)
spent inside the call, nested calls included.

``SIGUSR1`` writes a snapshot of every counter to ``DIR/<command>-<n>.json``;
the driver takes one before and one after the measured window and subtracts.
Threads get their Python name as their OS name (``prctl``), so that
``/proc/<pid>/task/*/comm`` can split the process's CPU time by thread.

The wrappers cost CPU themselves (a few microseconds per call): the counts are
exact, the CPU times are an upper bound; ``--mode plain`` and ``--mode pyspy``
measure the unmodified processes.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_dumps = json.dumps  # before it is wrapped: snapshots must not count themselves
_lock = threading.Lock()
_counts: dict[str, list[float]] = {}  # name -> [calls, thread CPU seconds, wall seconds]
_snapshots = 0
_counts_dir = Path(".")
_command = "service"


def count(name: str, calls: int = 1, cpu: float = 0.0, wall: float = 0.0) -> None:
    with _lock:
        entry = _counts.get(name)
        if entry is None:
            entry = _counts[name] = [0, 0.0, 0.0]
        entry[0] += calls
        entry[1] += cpu
        entry[2] += wall


def _caller(depth: int = 2) -> str:
    """``module:function`` of the first frame outside the wrappers and the library called."""
    frame = sys._getframe(depth)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.endswith("instrumented_service.py"):
            break
        frame = frame.f_back
    if frame is None:
        return "?"
    module = frame.f_globals.get("__name__", "?")
    return f"{module}:{frame.f_code.co_name}"


def _timed(name_of: Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` wrapped to count its calls and thread CPU under ``name_of(*args)``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            count(
                name_of(*args, **kwargs),
                cpu=time.thread_time() - cpu,
                wall=time.perf_counter() - wall,
            )

    return wrapper


def _timed_async(name_of: Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
    """A coroutine function wrapped to count its calls and the wall time until it returns."""

    @functools.wraps(function)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await function(*args, **kwargs)
        finally:
            count(name_of(*args, **kwargs), wall=time.perf_counter() - started)

    return wrapper


def _patch(owner: Any, attribute: str, make: Callable[[Callable[..., Any]], Any]) -> None:
    original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
    setattr(owner, attribute, make(original))


# --- what is counted ------------------------------------------------------------


def _instrument_json() -> None:
    import json as stdlib_json

    for name in ("dumps", "loads"):
        original = getattr(stdlib_json, name)
        setattr(
            stdlib_json,
            name,
            _timed(lambda *a, _n=name, **k: f"json.{_n} <- {_caller(3)}", original),
        )


def _model_name(target: Any) -> str:
    return target.__name__ if isinstance(target, type) else type(target).__name__


def _instrument_pydantic() -> None:
    from pydantic import BaseModel, TypeAdapter

    init = BaseModel.__init__

    def counted_init(self: Any, /, **data: Any) -> None:
        cpu = time.thread_time()
        try:
            init(self, **data)
        finally:
            count(
                f"pydantic {type(self).__name__}(...) <- {_caller(2)}", cpu=time.thread_time() - cpu
            )

    # pydantic tells its own __init__ by this mark; without it every model would
    # count as having a custom __init__, which validation then calls (twice the work).
    counted_init.__pydantic_base_init__ = True  # type: ignore[attr-defined]
    BaseModel.__init__ = counted_init  # type: ignore[method-assign]

    for name in ("model_validate_json", "model_validate"):
        original = BaseModel.__dict__[name].__func__

        def make(original: Callable[..., Any] = original, name: str = name) -> Any:
            def classmethod_body(cls: type[Any], *args: Any, **kwargs: Any) -> Any:
                cpu = time.thread_time()
                try:
                    return original(cls, *args, **kwargs)
                finally:
                    count(
                        f"pydantic {cls.__name__}.{name} <- {_caller(2)}",
                        cpu=time.thread_time() - cpu,
                    )

            return classmethod(classmethod_body)

        setattr(BaseModel, name, make())

    for name in ("model_dump_json", "model_dump"):
        original = BaseModel.__dict__[name]
        setattr(
            BaseModel,
            name,
            _timed(
                lambda self, *a, _n=name, **k: (
                    f"pydantic {type(self).__name__}.{_n} <- {_caller(3)}"
                ),
                original,
            ),
        )

    for name in ("validate_json", "validate_python", "dump_json", "dump_python"):
        original = TypeAdapter.__dict__[name]

        def adapter_name(self: Any, *args: Any, _n: str = name, **kwargs: Any) -> str:
            shown = getattr(self, "_type", None)
            label = getattr(shown, "__name__", None) or str(shown).replace("typing.", "")[:60]
            return f"pydantic TypeAdapter[{label}].{_n} <- {_caller(3)}"

        setattr(TypeAdapter, name, _timed(adapter_name, original))


def _instrument_contract() -> None:
    import email_validator

    from pipeline_shared import contract

    for name in ("check_json_data", "walk_json", "check_single_line", "check_address"):
        original = getattr(contract, name)
        if name == "walk_json":
            # A generator: count the calls and the values it yields, not its time.
            def walk(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                name = f"contract.walk_json <- {_caller(2)}"
                yielded = 0
                for item in _original(*args, **kwargs):
                    yielded += 1
                    yield item
                count(name)
                count(f"{name} (values yielded)", calls=yielded)

            setattr(contract, name, walk)
        else:
            setattr(
                contract,
                name,
                _timed(lambda *a, _n=name, **k: f"contract.{_n} <- {_caller(3)}", original),
            )
    email_validator.validate_email = _timed(  # type: ignore[assignment]
        lambda *a, **k: f"email_validator.validate_email <- {_caller(3)}",
        email_validator.validate_email,
    )
    try:
        from api_service import strict_json
    except ImportError:
        return
    strict_json.walk_json = contract.walk_json  # imported by name there


def _instrument_sql() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def store_method() -> str:
        frame = sys._getframe(2)
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module.endswith((".store", ".ledger")):
                return f"{module.rsplit('.', 1)[-1]}.{frame.f_code.co_name}"
            frame = frame.f_back
        return "?"

    @event.listens_for(Engine, "begin")
    def begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.info["bench"] = (mode, store_method(), time.thread_time(), time.perf_counter())

    def end(connection: Any, how: str) -> None:
        mode, site, cpu, wall = connection.info.pop(
            "bench", ("?", "?", time.thread_time(), time.perf_counter())
        )
        kind = "write" if mode == "IMMEDIATE" else "read"
        count(
            f"sql transaction {kind} ({mode}) {how} <- {site}",
            cpu=time.thread_time() - cpu,
            wall=time.perf_counter() - wall,
        )

    event.listen(Engine, "commit", lambda connection: end(connection, "commit"))
    event.listen(Engine, "rollback", lambda connection: end(connection, "rollback"))

    # The driver's own calls (the C library: statements, and COMMIT with its
    # fsync), which the events above fire before, not around.
    from sqlalchemy.engine import base, default

    def words(sql: str) -> str:
        return " ".join(sql.split()[:2])[:40]

    _patch(
        default.DefaultDialect,
        "do_execute",
        lambda original: _timed(
            lambda self, cursor, sql, *a, **k: f"sql driver execute {words(sql)}", original
        ),
    )
    _patch(
        default.DefaultDialect,
        "do_commit",
        lambda original: _timed(lambda *a, **k: "sql driver COMMIT (fsync for a write)", original),
    )
    _patch(
        default.DefaultDialect,
        "do_rollback",
        lambda original: _timed(lambda *a, **k: "sql driver ROLLBACK (end of a read)", original),
    )
    _patch(
        base.Engine,
        "connect",
        lambda original: _timed(
            lambda *a, **k: f"sql Engine.connect (pool checkout) <- {_caller(3)}", original
        ),
    )

    @event.listens_for(Engine, "before_cursor_execute")
    def statement(connection: Any, cursor: Any, sql: str, *rest: Any) -> None:
        count(f"sql statement {' '.join(sql.split()[:2])[:40]}")


def _instrument_threads() -> None:
    import asyncio
    import concurrent.futures

    to_thread = asyncio.to_thread

    async def counted_to_thread(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        name = getattr(function, "__qualname__", function)
        count(f"thread hop asyncio.to_thread({name}) <- {_caller(2)}")
        return await to_thread(function, *args, **kwargs)

    asyncio.to_thread = counted_to_thread  # type: ignore[assignment]

    submit = concurrent.futures.ThreadPoolExecutor.submit

    def counted_submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        count(f"executor submit ({self._thread_name_prefix or 'default'})")
        return submit(self, fn, *args, **kwargs)

    concurrent.futures.ThreadPoolExecutor.submit = counted_submit  # type: ignore[method-assign]

    import anyio.to_thread

    run_sync = anyio.to_thread.run_sync

    async def counted_run_sync(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        count(f"thread hop anyio.to_thread.run_sync({getattr(function, '__qualname__', function)})")
        return await run_sync(function, *args, **kwargs)

    anyio.to_thread.run_sync = counted_run_sync  # type: ignore[assignment]

    try:
        from mailer_service.blocking_pool import DaemonThreadPool
    except ImportError:
        return
    _patch(
        DaemonThreadPool,
        "run",
        lambda original: _timed_async(
            lambda *a, **k: "thread hop DaemonThreadPool.run (mailtrap send)", original
        ),
    )


def _instrument_broker() -> None:
    from aio_pika.message import IncomingMessage

    from pipeline_shared import messaging
    from pipeline_shared.messaging import broker as messaging_broker

    def publish_name(
        self: Any, exchange: Any, message: Any, routing_key: str, *rest: Any, **kw: Any
    ) -> str:
        return f"confirmed publish to {exchange.name}/{routing_key} (wall = wait for confirm)"

    _patch(messaging.Broker, "_publish", lambda original: _timed_async(publish_name, original))
    _patch(
        IncomingMessage,
        "ack",
        lambda original: _timed_async(lambda *a, **k: "basic.ack (wall)", original),
    )
    _patch(
        messaging.Consumer,
        "_handle",
        lambda original: _timed_async(
            lambda self, *a, **k: f"delivery handled from {self._queue.name} (wall)", original
        ),
    )
    _patch(
        messaging_broker,
        "event_message",
        lambda original: _timed(
            lambda event, *a, **k: f"messaging.event_message({type(event).__name__})", original
        ),
    )


def _instrument_logging() -> None:
    import logging

    from pipeline_shared import logs

    _patch(
        logging.StreamHandler,
        "emit",
        lambda original: _timed(
            lambda self, record: f"log record emitted ({record.name})", original
        ),
    )
    _patch(
        logs.PrivateDataFormatter,
        "format",
        lambda original: _timed(
            lambda *a, **k: "log PrivateDataFormatter.format (inside emit)", original
        ),
    )


def _instrument_service_steps() -> None:
    """A few calls of each service's own code whose CPU is worth seeing on its own."""
    import copy

    copy.deepcopy = _timed(lambda *a, **k: f"copy.deepcopy <- {_caller(3)}", copy.deepcopy)  # type: ignore[assignment]
    # (module, class or None, function, modules that imported the function by name)
    targets = [
        ("api_service.store", "JobStore", "_record", ()),
        ("api_service.store", "JobStore", "_reserve_key", ()),
        ("api_service.strict_json", None, "parse_json_body", ("api_service.strict_route",)),
        ("api_service.read_model", None, "apply", ("api_service.store",)),
        ("mailer_service.ledger", "SqlLedger", "_claim", ()),
        ("mailer_service.ledger", "SqlLedger", "_mark_sent", ()),
        ("mailer_service.compose", None, "compose_email", ("mailer_service.handlers",)),
        ("mailer_service.compose", None, "render_text", ()),
        ("mailer_service.mailtrap_transport", None, "to_mail", ()),
        ("mailer_service.mailtrap_transport", "MailtrapTransport", "_send_blocking", ()),
    ]
    import importlib

    for module_name, class_name, function_name, users in targets:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner = getattr(module, class_name) if class_name else module
        if not hasattr(owner, function_name):
            continue
        qualified = f"{class_name}.{function_name}" if class_name else function_name
        label = f"{module_name.rsplit('.', 1)[-1]}.{qualified}"
        original = owner.__dict__[function_name] if class_name else getattr(owner, function_name)
        wrapped = _timed(lambda *a, _l=label, **k: _l, original)
        setattr(owner, function_name, wrapped)
        for user in users:
            try:
                user_module = importlib.import_module(user)
            except ImportError:
                continue
            if getattr(user_module, function_name, None) is original:
                setattr(user_module, function_name, wrapped)


# --- thread names and snapshots -------------------------------------------------

_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def _set_os_thread_name(name: str) -> None:
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _name_threads() -> None:
    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def named(self: threading.Thread) -> None:
        _set_os_thread_name(self.name)
        bootstrap(self)

    threading.Thread._bootstrap_inner = named  # type: ignore[attr-defined]
    _set_os_thread_name("main")


def _snapshot(signum: int, frame: Any) -> None:
    global _snapshots
    with _lock:
        counts = {name: list(entry) for name, entry in _counts.items()}
    _snapshots += 1
    path = _counts_dir / f"{_command}-{_snapshots}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(_dumps({"pid": os.getpid(), "counts": counts}))
    temporary.replace(path)


def main() -> None:
    global _counts_dir, _command
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts-dir", type=Path, required=True)
    parser.add_argument("script", help="the console script to run, e.g. .venv/bin/api-service")
    args = parser.parse_args()
    _counts_dir, _command = args.counts_dir, Path(args.script).name

    _name_threads()
    _instrument_json()
    _instrument_pydantic()
    _instrument_contract()
    _instrument_sql()
    _instrument_threads()
    _instrument_broker()
    _instrument_logging()
    _instrument_service_steps()
    signal.signal(signal.SIGUSR1, _snapshot)

    sys.argv = [args.script]
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
