"""The API-key rule, one for the middleware that refuses a request before its body is read and
for the route dependencies that document it (`server.deps`)."""

import secrets

from server.errors import ApiError


def presented(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request presents: a bearer token, else the X-API-Key header."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return api_key


def known(key: str | None, keys: list[str]) -> bool:
    return key is not None and any(
        secrets.compare_digest(key.encode(), candidate.encode()) for candidate in keys
    )


def unauthorized(what: str) -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        f"{what} is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def api_key_refusal(key: str | None, api_keys: list[str], admin_keys: list[str]) -> ApiError | None:
    """Why a /v1 request is refused, or None: with API keys set, a known key must come with it.
    An admin key is accepted wherever an API key is: it is the stronger credential."""
    if api_keys and not known(key, [*api_keys, *admin_keys]):
        return unauthorized("a valid API key")
    return None
