"""Errors the services raise; the API turns each into an HTTP status with a JSON body
{"error": {"code": ..., "message": ..., "field": ...}}."""
from __future__ import annotations


class QuiverError(Exception):
    status_code = 400

    def __init__(self, code: str, message: str, *, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class InvalidInput(QuiverError):
    status_code = 400


class NotFound(QuiverError):
    status_code = 404


class Forbidden(QuiverError):
    status_code = 403


class Conflict(QuiverError):
    status_code = 409


class TooLarge(QuiverError):
    status_code = 413
