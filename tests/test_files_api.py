"""The Files API with the official openai SDK: uploads streamed into PostgreSQL, listed, read back, deleted."""

from __future__ import annotations

import io
import os
import socket

import httpx
import openai
import pytest
from openai import OpenAI

from tests.stack import RunningStack


def client(stack: RunningStack, key: str | None = None) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key or stack.headers()["authorization"].split()[1],
                  max_retries=0, timeout=60)


def test_upload_list_read_delete(stack: RunningStack) -> None:
    sdk = client(stack)
    content = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    created = sdk.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (len(content), "requests.jsonl",
                                                                                   "batch", "processed")
    assert sdk.files.retrieve(created.id).model_dump() == created.model_dump()
    assert created.id in [f.id for f in sdk.files.list(purpose="batch")]
    assert sdk.files.content(created.id).read() == content
    deleted = sdk.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(created.id)


def test_a_file_of_several_chunks_comes_back_byte_for_byte(stack: RunningStack) -> None:
    """3.5 MB of random bytes: stored as 1 MiB chunks as it streams in, read back in order."""
    content = os.urandom(3_500_000)
    sdk = client(stack)
    created = sdk.files.create(file=("big.jsonl", io.BytesIO(content)), purpose="batch")
    assert created.bytes == len(content)
    assert sdk.files.content(created.id).read() == content
    sdk.files.delete(created.id)


def test_pagination_with_after_and_limit(stack: RunningStack) -> None:
    sdk = client(stack)
    ids = [sdk.files.create(file=(f"p{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(3)]
    page = sdk.files.list(limit=2, order="asc", after=ids[0])
    assert [f.id for f in page.data] == ids[1:]
    newest = sdk.files.list(limit=1)
    assert [f.id for f in newest.data] == [ids[2]] and newest.has_more
    for file_id in ids:
        sdk.files.delete(file_id)


def test_files_belong_to_the_key_that_uploaded_them(stack: RunningStack) -> None:
    key = httpx.post(f"{stack.url}/v1/keys", json={"name": "files-owner"}, headers=stack.headers()).json()["key"]
    other = httpx.post(f"{stack.url}/v1/keys", json={"name": "files-other"}, headers=stack.headers()).json()["key"]
    mine = client(stack, key).files.create(file=("mine.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        client(stack, other).files.retrieve(mine.id)
    assert mine.id not in [f.id for f in client(stack, other).files.list()]
    with pytest.raises(openai.NotFoundError):
        client(stack, other).files.delete(mine.id)
    assert client(stack).files.retrieve(mine.id).id == mine.id  # the master key sees every file


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"files": {"file": ("x.jsonl", b"{}\n")}}, "purpose"),
    ({"files": {"file": ("x.jsonl", b"{}\n")}, "data": {"purpose": "assistants"}}, "purpose"),
    ({"files": {"attachment": ("x.jsonl", b"{}\n")}, "data": {"purpose": "batch"}}, "file"),
])
def test_bad_uploads_get_a_400_naming_the_parameter(stack: RunningStack, kwargs: dict, param: str) -> None:
    r = httpx.post(f"{stack.url}/v1/files", headers=stack.headers(), timeout=30, **kwargs)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("body,content_type", [
    (b'{"purpose": "batch"}', "application/json"),
    (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc", "multipart/form-data"),
    (b"garbage without a boundary", "multipart/form-data; boundary=xyz"),
])
def test_a_body_that_is_not_a_multipart_upload_gets_a_400(stack: RunningStack, body: bytes,
                                                           content_type: str) -> None:
    r = httpx.post(f"{stack.url}/v1/files", content=body, timeout=30,
                   headers={**stack.headers(), "content-type": content_type})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    assert httpx.get(f"{stack.url}/health").status_code == 200


def test_an_upload_past_the_size_limit_is_refused_before_it_is_read(stack: RunningStack) -> None:
    """A declared 300 MB body gets its 413 at once (nothing of it is read or stored)."""

    head = (f"POST /v1/files HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {stack.headers()['authorization']}\r\n"
            "content-type: multipart/form-data; boundary=xyz\r\ncontent-length: 300000000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as conn:
        conn.sendall(head.encode() + b"--xyz\r\n")
        answer = _read_answer(conn).decode(errors="replace")
    status = answer.split("\r\n", 1)[0]
    assert " 413 " in status, answer
    assert '"file_too_large"' in answer


def _read_answer(conn: socket.socket) -> bytes:
    """One whole HTTP answer from a raw socket: headers and body can arrive in separate reads."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return data
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
