"""Kubernetes ``Status`` errors, shaped like the real API server's.

Clients branch on ``code`` and ``reason`` (kopf: 409 → conflict, 422 → "patch test failed, retry later";
the ``kubernetes`` client: ``ApiException.status``; kubectl prints ``message``), so every error the emulator
raises carries the same code, reason and message wording as kube-apiserver's.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered as a ``v1.Status`` object with the given HTTP code."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _qualified(plural: str, group: str) -> str:
    return f"{plural}.{group}" if group else plural


def _details(plural: str, group: str, name: str | None, kind: str | None = None) -> dict[str, Any]:
    details: dict[str, Any] = {"group": group, "kind": kind or plural}
    if name is not None:
        details["name"] = name
    return details


def not_found(plural: str, group: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{_qualified(plural, group)} "{name}" not found', _details(plural, group, name))


def already_exists(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        409, "AlreadyExists", f'{_qualified(plural, group)} "{name}" already exists', _details(plural, group, name)
    )


def conflict(plural: str, group: str, name: str, why: str | None = None) -> ApiError:
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(plural, group)} "{name}": {why}',
        _details(plural, group, name),
    )


def invalid(plural: str, group: str, name: str | None, kind: str, causes: list[tuple[str, str]]) -> ApiError:
    """422 Invalid with field causes, as admission/validation would answer."""
    text = "; ".join(f"{field}: {msg}" for field, msg in causes)
    details = _details(plural, group, name, kind)
    details["causes"] = [{"reason": "FieldValueInvalid", "message": msg, "field": field} for field, msg in causes]
    return ApiError(422, "Invalid", f'{kind} "{name or ""}" is invalid: {text}', details)


def unprocessable(message: str) -> ApiError:
    """422 as answered for a JSON-patch that cannot be applied (failed ``test`` op, missing path)."""
    return ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {message}")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media "
        f"types include: application/json-patch+json, application/merge-patch+json, "
        f"application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type!r})",
    )


def resource_not_found(path: str) -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {"path": path})


def too_many_requests(retry_after: int = 1) -> ApiError:
    return ApiError(
        429,
        "TooManyRequests",
        "Too many requests, please try again later.",
        {"retryAfterSeconds": retry_after},
        headers={"Retry-After": str(retry_after)},
    )


def internal_error(message: str = 'an error on the server ("injected fault") has prevented the request') -> ApiError:
    return ApiError(500, "InternalError", message)


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)
