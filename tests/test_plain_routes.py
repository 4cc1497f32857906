"""The plain ASGI chat route answers as the FastAPI route did, on the paths that need no broker: the app's own
middlewares and error handlers apply to it, it is documented in /openapi.json, other methods get a 405.
The full path through Kafka is tested in test_gateway_api.py (and every error shape in test_abuse*.py).
"""

from __future__ import annotations

import httpx

from switchyard.services.ingress.app import Gateway, create_app
from switchyard.shared.config_schema import GatewayConfig
from switchyard.shared.settings import Settings

URL = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _client() -> httpx.AsyncClient:
    app = create_app(Gateway(Settings(master_key="mk"), GatewayConfig(), reply_partition=0))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


async def test_errors_come_from_the_apps_handlers_with_every_header() -> None:
    async with _client() as client:
        missing = await client.post(URL, json=BODY)
        bad_json = await client.post(URL, content=b"{nope", headers={"authorization": "Bearer mk"})
        no_model = await client.post(URL, json={"messages": BODY["messages"]}, headers={"authorization": "Bearer mk"})
        unknown = await client.post(URL, json={**BODY, "model": "x" * 1000}, headers={"authorization": "Bearer mk"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert len(unknown.json()["error"]["message"]) < 400  # the caller's 1,000 characters are not echoed in full
    for r in (missing, bad_json, no_model, unknown):
        assert r.headers["content-type"] == "application/json"
        assert len(r.headers["x-request-id"]) == 32 and r.headers["x-switchyard-trace-id"]
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"


async def test_other_methods_are_405_and_the_route_is_documented() -> None:
    async with _client() as client:
        get = await client.get(URL)
        doc = (await client.get("/openapi.json")).json()
    assert get.status_code == 405
    operation = doc["paths"][URL]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionRequest")


async def test_the_metrics_label_the_plain_route_by_its_template() -> None:
    async with _client() as client:
        await client.post(URL, json=BODY)
        text = (await client.get("/metrics")).text
    assert 'switchyard_requests_total{model="other",route="/v1/chat/completions",status_code="401"}' in text
