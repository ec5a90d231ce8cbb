"""Who may call the jobs API: holders of ``COMFYS3_API_TOKEN``, sent as a bearer token.

Anyone who can POST /jobs can make the GPUs work and, with raw graphs allowed, run any node,
so serving with no token is refused unless asked for (``COMFYS3_API_ALLOW_NO_TOKEN``), and even
then only on a loopback address, where only this machine can connect.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from processor import SettingsError, WorkerSettings
from triggers.api.models import ApiError

Guard = Callable[..., Awaitable[None]]
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serving_token(settings: WorkerSettings, host: str) -> str | None:
    """The token requests must carry, or None when serving without one is allowed here;
    a :class:`SettingsError` saying what to set otherwise."""
    api = settings.api
    if api.token is not None and api.token.get_secret_value():
        return api.token.get_secret_value()
    if not api.allow_no_token:
        raise SettingsError(
            "the jobs API needs a token: set COMFYS3_API_TOKEN (clients send "
            "'Authorization: Bearer <token>'), or COMFYS3_API_ALLOW_NO_TOKEN=1 to serve "
            "without one on a loopback address"
        )
    if not is_loopback(host):
        raise SettingsError(
            f"COMFYS3_API_ALLOW_NO_TOKEN is honoured only on a loopback address, not {host}: "
            "set COMFYS3_API_TOKEN, or listen on 127.0.0.1"
        )
    return None


def bearer_guard(token: str | None) -> Guard:
    """The dependency every route but /healthz and the docs runs first."""
    scheme = HTTPBearer(
        auto_error=False, description="COMFYS3_API_TOKEN, as `Authorization: Bearer <token>`."
    )
    expected = None if token is None else token.encode()

    async def guard(
        credentials: HTTPAuthorizationCredentials | None = Security(scheme),  # noqa: B008
    ) -> None:
        if expected is None:
            return
        if credentials is None:
            raise ApiError(
                401,
                "this API needs a bearer token: send 'Authorization: Bearer <token>' with the "
                "token set in COMFYS3_API_TOKEN",
                headers=CHALLENGE,
            )
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(
                401,
                "the bearer token is not this API's token (COMFYS3_API_TOKEN)",
                headers=CHALLENGE,
            )

    return guard
