"""OpenAI-style errors: every refused request gets ``{"error": {"message", "type", "param", "code"}}`` and a 4xx."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client (HTTP status, OpenAI error type, the offending parameter, a short code)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request that cannot be served as given."""
    return APIError(message, 400, "invalid_request_error", param, code)


def model_not_found(name: Any, served: str) -> APIError:
    return APIError(
        f"The model {name!r} does not exist on this server; it serves {served!r} (see GET /v1/models).",
        404,
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def queue_full(message: str) -> APIError:
    return APIError(message, 429, "rate_limit_error", None, "queue_full")


def shutting_down() -> APIError:
    return APIError("The server is shutting down and takes no new requests.", 503, "server_error", None,
                    "shutting_down")


def server_error(message: str) -> APIError:
    return APIError(message, 500, "server_error", None, "internal_error")


__all__ = ["APIError", "invalid", "model_not_found", "queue_full", "shutting_down", "server_error"]
