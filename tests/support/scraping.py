"""Reading a service's Prometheus metrics in a test."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Figure = tuple[str, frozenset[tuple[str, str]]]


def figure(name: str, **labels: str) -> Figure:
    return name, frozenset(labels.items())


def scrape(url: str) -> dict[Figure, float]:
    """Every sample ``url/metrics`` shows, by name and labels."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        figure(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
