"""Processing steps: plain functions from a job's data to its result, registered by name.

To add a step, write a function that takes the job's data (a JSON object) and
returns a JSON object, and decorate it with ``@step("name")``; callers then ask
for it with ``"step": "name"``. Steps run in worker threads, off the event loop,
so they may be slow or CPU-heavy. A step that raises fails its job.

A step registered with ``inline=True`` promises to be cheap (its time grows
with its data and is microseconds for a small job) and never to change its
input: for a small job it runs on the event loop, without a copy of the data
or a hop to a thread and back, which would cost more than the step itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from statistics import mean
from typing import Any

Data = Mapping[str, Any]
Result = dict[str, Any]
Step = Callable[[Data], Result]

STEPS: dict[str, Step] = {}
"""Every registered step, by name."""
INLINE_STEPS: set[str] = set()
"""The registered steps that may run on the event loop for small jobs."""


def step(name: str, *, inline: bool = False) -> Callable[[Step], Step]:
    """Register the decorated function as the processing step ``name`` (``inline``:
    see the module's docstring)."""

    def register(function: Step) -> Step:
        if name in STEPS:
            raise ValueError(f"a processing step named {name!r} is already registered")
        STEPS[name] = function
        if inline:
            INLINE_STEPS.add(name)
        return function

    return register


class UnknownStep(LookupError):
    pass


def get_step(name: str, registry: Mapping[str, Step] = STEPS) -> Step:
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise UnknownStep(f"unknown processing step {name!r} (known: {known})") from None


def _is_number(value: object) -> bool:
    # bool is an int subclass, but True is not a measurement.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _stats(values: list[int | float]) -> dict[str, int | float]:
    # min and max are the values as given (a large integer stays exact); the
    # mean is computed exactly and rounded once, so it cannot overflow: it
    # lies between min and max, which the job's limits keep within a double.
    return {"min": min(values), "max": max(values), "mean": float(mean(values))}


@step("summarise", inline=True)
def summarise(data: Data) -> Result:
    """Field count, the numeric fields' min/max/mean, and list lengths."""
    numeric = {key: value for key, value in data.items() if _is_number(value)}
    lists = {key: len(value) for key, value in data.items() if isinstance(value, list)}
    return {
        "field_count": len(data),
        "numeric_fields": sorted(numeric),
        "numeric_summary": _stats(list(numeric.values())) if numeric else None,
        "list_lengths": lists,
    }


@step("word_count", inline=True)
def word_count(data: Data) -> Result:
    """The number of words in the data's ``text`` field."""
    return {"words": len(str(data.get("text", "")).split())}


@step("echo", inline=True)
def echo(data: Data) -> Result:
    """The data unchanged: for trying the pipeline out."""
    return dict(data)
