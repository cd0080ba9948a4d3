"""The API key the SDK sends, as `authorization: Bearer <key>` call metadata.

Taken from `api_key=`, else `$DYSPEC_API_KEY`, else `$OPENAI_API_KEY` (what the openai client reads,
so one variable serves both clients against the same server). None: no key is sent, for servers
that require none. Over a plaintext channel the key travels in clear: use TLS off loopback.
"""
from __future__ import annotations

import os

ENV_VARS = ("DYSPEC_API_KEY", "OPENAI_API_KEY")


def resolve_api_key(api_key: str | None, environ=os.environ) -> str | None:
    if api_key is not None:
        if not api_key.strip():
            raise ValueError("api_key is empty: pass a key, or None to read $DYSPEC_API_KEY / $OPENAI_API_KEY")
        return api_key.strip()
    for name in ENV_VARS:
        if environ.get(name, "").strip():
            return environ[name].strip()
    return None


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
