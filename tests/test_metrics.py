"""Prometheus /metrics on every service of a real stack: after a known mix of requests (ok, provider error,
failover, stream) the counters and histograms say what happened, with bounded labels."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchyard.shared import metrics
from tests.conftest import Fakes
from tests.stack import RunningStack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CHAT = "/v1/chat/completions"


def scrape(url: str) -> tuple[Samples, set[str], str]:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    families = set()
    for family in text_string_to_metric_families(r.text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, families, r.text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def urls(stack: RunningStack) -> dict[str, str]:
    found: dict[str, str] = stack.info["metrics_urls"]
    return found


def scrape_all(stack: RunningStack) -> dict[str, Samples]:
    return {name: scrape(url)[0] for name, url in urls(stack).items()}


def chat(stack: RunningStack, model: str, text: str, **extra: object) -> httpx.Response:
    return httpx.post(f"{stack.url}{CHAT}", json={"model": model, "messages": [{"role": "user", "content": text}],
                                                   **extra}, headers=stack.headers(), timeout=60)


def wait_for(check: object, what: str, timeout_s: float = 30.0) -> None:
    """Poll the scrapes until `check()` holds: the workers' counters move when the call ends, a moment after
    the caller has its answer."""
    deadline = time.time() + timeout_s
    while not check():  # type: ignore[operator]
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_every_service_serves_every_family(stack: RunningStack) -> None:
    names = urls(stack)
    assert {n.split("-")[0] for n in names} == {"ingress", "router", "worker", "accounting"}
    for name, url in names.items():
        _, families, text = scrape(url)
        missing = [m for m in metrics.EXPORTED if m.removesuffix("_total") not in families]
        assert not missing, f"{name} lacks {missing}"
        assert "_created" not in text


def test_known_mix_of_requests_is_counted(stack: RunningStack, fakes: Fakes) -> None:
    before = scrape_all(stack)
    prompt_tokens = completion_tokens = 0
    for text in ("one", "two three"):
        r = chat(stack, "gpt-test", text)
        assert r.status_code == 200, r.text
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
        completion_tokens += r.json()["usage"]["completion_tokens"]
    with httpx.stream("POST", f"{stack.url}{CHAT}", headers=stack.headers(), timeout=60, json={
            "model": "gpt-test", "messages": [{"role": "user", "content": "a stream"}], "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usage = [httpx.Response(200, content=line[6:]).json().get("usage") for line in lines]
    final = [u for u in usage if u]
    assert final, lines
    prompt_tokens += final[-1]["prompt_tokens"]
    completion_tokens += final[-1]["completion_tokens"]
    fakes.faulty.inject(status=400, message="bad upstream request")
    assert chat(stack, "faulty", "x").status_code == 400
    fakes.primary.inject(status=503, times=1)
    assert chat(stack, "failover", "hi").status_code == 200
    assert chat(stack, "no-such-model-" + str(time.time()), "x").status_code == 404

    ingress = next(n for n in urls(stack) if n.startswith("ingress"))
    worker = next(n for n in urls(stack) if n.startswith("worker-openai"))

    def delta(service: str, name: str, **labels: str) -> float:
        return value(scrape(urls(stack)[service])[0], name, **labels) - value(before[service], name, **labels)

    wait_for(lambda: delta(worker, "switchyard_provider_calls_total", provider="openai", deployment="failover/1",
                           outcome="ok") >= 1, "the failover's second call to be counted")
    after = scrape_all(stack)

    def d(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    # Ingress: every request by route, model and status; unknown models do not become labels.
    assert d(ingress, "switchyard_requests_total", route=CHAT, model="gpt-test", status_code="200") == 3
    assert d(ingress, "switchyard_requests_total", route=CHAT, model="faulty", status_code="400") == 1
    assert d(ingress, "switchyard_requests_total", route=CHAT, model="failover", status_code="200") == 1
    assert d(ingress, "switchyard_requests_total", route=CHAT, model="other", status_code="404") == 1
    assert not any("no-such-model" in str(key) for key in after[ingress])
    assert d(ingress, "switchyard_request_duration_seconds_count", route=CHAT, model="gpt-test") == 3
    assert d(ingress, "switchyard_time_to_first_token_seconds_count", model="gpt-test") == 1
    assert d(ingress, "switchyard_overhead_duration_seconds_count", route=CHAT) == 4  # the answers with a provider
    assert d(ingress, "gen_ai_server_request_duration_count", gen_ai_operation_name="chat",
             gen_ai_request_model="gpt-test", error_type="") == 3
    assert d(ingress, "gen_ai_server_time_to_first_token_count", gen_ai_operation_name="chat",
             gen_ai_request_model="gpt-test") == 1

    # Workers: calls by outcome (the failover's first call failed), tokens exactly as the answers reported them.
    assert d(worker, "switchyard_provider_calls_total", provider="openai", deployment="gpt-test/0", outcome="ok") == 3
    assert d(worker, "switchyard_provider_calls_total", provider="openai", deployment="faulty/0",
             outcome="client_error") == 1
    assert d(worker, "switchyard_provider_calls_total", provider="openai", deployment="failover/0",
             outcome="server_error") == 1
    assert d(worker, "switchyard_provider_calls_total", provider="openai", deployment="failover/1", outcome="ok") == 1
    assert d(worker, "switchyard_provider_duration_seconds_count", provider="openai", deployment="gpt-test/0") == 3
    assert d(worker, "switchyard_tokens_total", provider="openai", model="gpt-test", type="input") == prompt_tokens
    assert d(worker, "switchyard_tokens_total", provider="openai", model="gpt-test", type="output") == completion_tokens
    assert d(worker, "switchyard_cost_usd_total", provider="openai", model="gpt-test") > 0
    assert d(worker, "gen_ai_client_token_usage_sum", gen_ai_operation_name="chat", gen_ai_provider_name="openai",
             gen_ai_request_model="gpt-test", gen_ai_token_type="input") == prompt_tokens
    assert ("switchyard_pacing_queue_depth", frozenset({("deployment", "gpt-test/0")})) in after[worker]

    # Router: every configured deployment's breaker state (failover/0's depends on what earlier tests on this
    # shared stack did to it; gpt-test/0 only ever answers), and consumer lag per stage.
    router = next(n for n in urls(stack) if n.startswith("router"))
    assert value(after[router], "switchyard_deployment_state", deployment="gpt-test/0") == 0
    assert value(after[router], "switchyard_deployment_state", deployment="failover/0") in (0, 1, 2)
    assert ("switchyard_deployment_state", frozenset({("deployment", "nova/0")})) in after[router]
    wait_for(lambda: "accounting llm.usage" in _lag_groups(stack, "accounting"), "accounting's lag to be measured")
    wait_for(lambda: "router llm.requests" in _lag_groups(stack, "router"), "the router's lag to be measured")
    wait_for(lambda: "workers.openai llm.provider.openai" in _lag_groups(stack, "worker-openai"),
             "the workers' lag to be measured")


def _lag_groups(stack: RunningStack, service_prefix: str) -> set[str]:
    name = next(n for n in urls(stack) if n.startswith(service_prefix))
    return {dict(labels)["group"] + " " + dict(labels)["topic"]
            for metric, labels in scrape(urls(stack)[name])[0] if metric == "switchyard_consumer_lag"}


def test_metrics_endpoints_survive_hostile_requests(stack: RunningStack) -> None:
    """Odd methods, paths and headers on the health port's /metrics neither break it nor add labels."""
    router = next(url for n, url in urls(stack).items() if n.startswith("router"))
    for path in ("/metrics?x=" + "a" * 5000, "/metrics/../../etc", "/nothing"):
        r = httpx.get(router.removesuffix("/metrics") + path, timeout=10)
        assert r.status_code in (200, 404)
    r = httpx.get(f"{stack.url}/v1/nothing-here", headers={"traceparent": "garbage"}, timeout=10)
    assert r.status_code == 404
    assert len(r.headers["x-switchyard-trace-id"]) == 32
    samples, _, _ = scrape(f"{stack.url}/metrics")
    assert value(samples, "switchyard_requests_total", route="other", model="other", status_code="404") >= 1


# ---- deploy/grafana: every query names a metric the code exports --------------------------------------------

DASHBOARDS = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
_SELECTORS = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*(\()?)")
_PROMQL_WORDS = {"sum", "rate", "increase", "max", "min", "avg", "count", "histogram_quantile", "irate", "topk",
                 "bottomk", "abs", "clamp_min", "and", "or", "unless", "offset", "bool", "le"}
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (selectors, ranges and grouping clauses removed first)."""
    bare = _SELECTORS.sub(" ", expr)
    names = set()
    for m in _IDENTIFIER.finditer(bare):
        if m.group(1) is None and m.group(0) not in _PROMQL_WORDS and not m.group(0).startswith("$"):
            names.add(m.group(0))
    return names


def exported_family(name: str) -> str | None:
    """The family in shared/metrics.py that `name` is a series of (a histogram's _bucket, _sum, _count too)."""
    for candidate in (name, *(name.removesuffix(s) for s in _SERIES_SUFFIXES if name.endswith(s))):
        if candidate in metrics.EXPORTED:
            return candidate
    return None


def test_metric_names_in_promql_are_found() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{x="y"}[5m]))) / b') == {
        "a_bucket", "b"}
    assert exported_family("switchyard_request_duration_seconds_bucket") == "switchyard_request_duration_seconds"
    assert exported_family("switchyard_request_total") is None  # a typo is caught


def test_every_dashboard_query_names_an_exported_metric() -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, "deploy/grafana has no dashboard"
    used: set[str] = set()
    for path in files:
        dashboard = json.loads(path.read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
        assert exprs, f"{path.name} has no queries"
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"{path.name}: no metric in {expr!r}"
            for name in names:
                family = exported_family(name)
                assert family is not None, f"{path.name}: {name!r} is not exported (shared/metrics.py)"
                used.add(family)
    # The dashboard shows what operators asked for: traffic, errors, latency, TTFT, tokens, cost, breakers,
    # consumer lag and pacing queues.
    assert used >= {"switchyard_requests_total", "switchyard_request_duration_seconds",
                    "switchyard_time_to_first_token_seconds", "switchyard_tokens_total", "switchyard_cost_usd_total",
                    "switchyard_deployment_state", "switchyard_consumer_lag", "switchyard_pacing_queue_depth"}
