"""Bench only: Prometheus recording turned into no-ops, in every process that has this folder on PYTHONPATH.

bench/observability.py puts this folder on the base stack's PYTHONPATH, so that base records no metric at all
(Python imports `sitecustomize` at start-up) while the observed stack, the same checkout, records every metric
and every span: the A/B the issue asks for (Prometheus and tracing on against both off), on one tree.
Switchyard itself has no switch to turn its metrics off, on purpose.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import metrics


def _record(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def _labels(self: Any, *args: Any, **kwargs: Any) -> Any:
    return self


for _kind in (metrics.Counter, metrics.Gauge, metrics.Histogram, metrics.Summary):
    for _name in ("inc", "dec", "set", "observe"):
        if hasattr(_kind, _name):
            setattr(_kind, _name, _record)
metrics.MetricWrapperBase.labels = _labels  # type: ignore[method-assign]
