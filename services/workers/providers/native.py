"""Same-format passthrough: when a worker sends the caller's own provider-format request as written.

Ingress carries a request written in a provider's format (`POST /v1/messages`) twice in the envelope:
translated to OpenAI's shape in `body`, which every provider can serve, and as written in `native`. A
deployment whose adapter speaks that format sends `native` unchanged (only `model` replaced), so nothing
a translation cannot express is lost, and its answer goes back as the provider wrote it.
"""

from __future__ import annotations

from switchyard.services.workers.providers.base import ProviderAdapter
from switchyard.shared.contracts import NativeRequest, RequestEnvelope
from switchyard.shared.native import native_required


def native_request(env: RequestEnvelope, adapter: ProviderAdapter, *, guarded: bool) -> NativeRequest | None:
    """The envelope's native request when `adapter` speaks its format, else None (the OpenAI body is sent).

    Not when output guardrails apply (`guarded`): they read and mask OpenAI-shaped answers, and an answer
    they cannot read must not reach the caller unchecked, so such a call is translated. A request its OpenAI
    body does not fully express (`NativeRequest.lossy`) is then not sent at all: raises `native_required`'s 400.
    """
    native = env.native
    if native is None or env.kind != "chat":
        return None
    if guarded or native.format != adapter.native_format:
        if native.lossy is not None:
            why = ("output guardrails, which read and mask answers in OpenAI's format, apply to it" if guarded
                   else f"the deployment chosen speaks another format ({adapter.name})")
            raise native_required(native.lossy, native.format, why)
        return None
    return native
