"""Which deployments can serve a request only its own format expresses, and the 400 for those that cannot.

A `POST /v1/messages` request may use what OpenAI's format has no words for (an Anthropic server tool such as
`web_search_20250305`, a `web_search_tool_result` block in the history): ingress marks its envelope
(`NativeRequest.lossy`), the router sends it only to deployments whose provider speaks that format
(`NATIVE_FORMATS`), and any stage that cannot send it as written answers `native_required`, a 400 naming the
parameter: such a request is never served with the part left out.
"""

from __future__ import annotations

from switchyard.shared.contracts import LossyPart, NativeFormat, RequestEnvelope
from switchyard.shared.errors import GatewayError

NATIVE_FORMATS: dict[str, NativeFormat] = {"anthropic": "anthropic"}
"""Provider name -> the format its adapter sends a native request in unchanged (`ProviderAdapter.native_format`)."""

FORMAT_NAMES: dict[NativeFormat, str] = {"anthropic": "Anthropic"}

NATIVE_REQUIRED = "native_format_required"
"""The error code of a request that only a deployment of its own format can serve, sent where none can."""


def required_format(env: RequestEnvelope) -> NativeFormat | None:
    """The format every deployment serving `env` must speak; None when its OpenAI body serves it as well."""
    native = env.native
    return native.format if native is not None and native.lossy is not None else None


def speaks(provider: str, fmt: NativeFormat | None) -> bool:
    """Whether a deployment of `provider` can serve a request that requires `fmt` (None: any can)."""
    return fmt is None or NATIVE_FORMATS.get(provider) == fmt


def native_required(lossy: LossyPart, fmt: NativeFormat, why: str) -> GatewayError:
    """The 400 for a request using `lossy` where it cannot be sent as written; `why` says what stood in the way."""
    name = FORMAT_NAMES.get(fmt, fmt)
    return GatewayError(400, f"{lossy.param}: {lossy.message}. Only a deployment of an {name} model can serve it "
                             f"(the request is passed through as written), and {why}.",
                        param=lossy.param, code=NATIVE_REQUIRED, retryable=False)
