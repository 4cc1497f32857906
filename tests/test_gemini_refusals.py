"""Gemini: a caller cannot make the gateway read its own Google project's caches or files.

Gemini resolves `cachedContent`, Files API names and gs:// / googleapis.com URIs with the deployment's
credentials, so forwarding a caller's would let one caller read what another cached or uploaded. The adapter
refuses them with a 400 that names the parameter; public http(s) media URLs and data: URLs still pass.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from switchyard.services.workers.providers.base import CallContext
from switchyard.services.workers.providers.gemini import GeminiAdapter, public_media_url
from switchyard.shared.config_schema import Deployment
from switchyard.shared.errors import GatewayError
from tests.conftest import Fakes
from tests.stack import MASTER_KEY, RunningStack

USER = {"role": "user", "content": "describe it"}


def image(url: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def file(**fields: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "summarise"}, {"type": "file", "file": fields}]}


def translate(body: dict[str, Any]) -> dict[str, Any]:
    dep = Deployment(provider="gemini", model="gemini-2.5-flash", api_base="http://127.0.0.1:9", api_key="g-key",
                     id="g/0")
    ctx = CallContext(deployment=dep, body={"model": "g", **body}, stream=False, api_key="g-key", request_id="r1")
    request = GeminiAdapter().chat_request(ctx)
    assert request.content is not None
    return dict(orjson.loads(request.content))


IMAGE_PARAM = "messages[0].content[1].image_url.url"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [USER], "cached_content": "cachedContents/someone-elses"}, "cached_content"),
    ({"messages": [USER], "cachedContent": "cachedContents/someone-elses"}, "cachedContent"),
    ({"messages": [image("gs://gateway-bucket/private.png")]}, IMAGE_PARAM),
    ({"messages": [image("files/abc123")]}, IMAGE_PARAM),
    ({"messages": [image("https://generativelanguage.googleapis.com/v1beta/files/abc123")]}, IMAGE_PARAM),
    ({"messages": [image("https://storage.googleapis.com/gateway-bucket/private.png")]}, IMAGE_PARAM),
    ({"messages": [image("HTTPS://Storage.GoogleAPIs.com./gateway-bucket/private.png")]}, IMAGE_PARAM),
    ({"messages": [file(file_id="files/abc123")]}, "messages[0].content[1].file.file_id"),
    ({"messages": [file(file_data="gs://gateway-bucket/report.pdf", filename="r.pdf")]},
     "messages[0].content[1].file.file_data"),
    ({"messages": [file(file_data="files/abc123")]}, "messages[0].content[1].file.file_data"),
])
def test_project_references_are_refused_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        translate(body)
    err = caught.value
    assert (err.status, err.param, err.retryable) == (400, param, False)
    assert err.body()["error"]["type"] == "invalid_request_error"
    assert param in err.message


def test_public_media_and_inline_data_still_pass() -> None:
    sent = translate({"messages": [image("https://example.com/cat.jpg"),
                                   file(file_data="data:application/pdf;base64,JVBERi0=", filename="a.pdf")]})
    parts = [p for c in sent["contents"] for p in c["parts"]]
    assert {"fileData": {"fileUri": "https://example.com/cat.jpg", "mimeType": "image/jpeg"}} in parts
    assert {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}} in parts
    assert "cachedContent" not in sent


@pytest.mark.parametrize(("url", "public"), [
    ("https://example.com/a.png", True), ("http://images.example.org/x", True),
    ("https://googleapis.com.example.com/a.png", True),
    ("gs://b/a.png", False), ("files/abc", False), ("https://storage.googleapis.com/b/a.png", False),
    ("https://generativelanguage.googleapis.com/v1beta/files/x", False),
    ("https://storage.cloud.google.com/b/a", False),
    ("ftp://example.com/a.png", False), ("https:///nohost", False), ("http://[::1", False), ("", False),
])
def test_public_media_url(url: str, public: bool) -> None:
    assert public_media_url(url) is public


# ---- live: through ingress, router and the Gemini worker, against the fake -----------------------


def test_refused_live_and_nothing_reaches_gemini(stack: RunningStack, fakes: Fakes) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=MASTER_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gemini-flash", messages=[USER],  # type: ignore[list-item]
                                       extra_body={"cached_content": "cachedContents/someone-elses"})
    assert caught.value.body is not None and caught.value.body.get("param") == "cached_content"  # type: ignore[union-attr,attr-defined]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gemini-flash",
                                       messages=[image("gs://gateway-bucket/private.png")])  # type: ignore[list-item]
    assert caught.value.body.get("param") == IMAGE_PARAM  # type: ignore[union-attr,attr-defined]
    assert fakes.gemini.calls() == [], "a refused request must not reach Gemini"

    # The same deployment still serves, public image URLs included.
    answer = client.chat.completions.create(model="gemini-flash",
                                            messages=[image("https://example.com/cat.jpg")])  # type: ignore[list-item]
    assert answer.choices[0].message.content == "Echo: what is this? [1 image(s)]"
    (sent,) = fakes.gemini.calls()
    assert "cachedContent" not in sent.body
