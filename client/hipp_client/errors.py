"""``HippApiError``: the one exception the client raises, for an API error answer and for everything else that
stops a call (the API out of reach, a download whose SHA-256 does not match, a wait that ran out of time)."""

from __future__ import annotations

from typing import Any

import httpx

#: ``code`` of the errors that do not come from the API's JSON error body.
UNREACHABLE = "unreachable"
CHECKSUM_MISMATCH = "checksum_mismatch"
DOWNLOAD_FAILED = "download_failed"
WAIT_TIMEOUT = "wait_timeout"
NO_SUCH_ARTIFACT = "no_such_artifact"
BAD_RESPONSE = "bad_response"
UPLOAD_FAILED = "upload_failed"


class HippApiError(Exception):
    """``status``: the HTTP status (``None`` when no answer came); ``code`` and ``message``: the API's error
    (``{"error": {"code", "message", "detail"}}``) or one of this module's codes; ``detail``: the API's."""

    def __init__(self, status: int | None, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        where = f"{self.status} {self.code}" if self.status is not None else self.code
        return f"{self.message} [{where}]"

    @classmethod
    def from_response(cls, r: httpx.Response) -> HippApiError:
        """The API's JSON error body of ``r``; any other body (a proxy's page) becomes ``http_error``."""
        try:
            err = r.json()["error"]
            return cls(r.status_code, str(err["code"]), str(err["message"]), err.get("detail"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(r.status_code, "http_error", f"HTTP {r.status_code}: {r.text[:300]}")
