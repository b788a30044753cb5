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


class TooManyJobs(QuiverError):
    status_code = 429


def is_backend_outage(error: BaseException) -> bool:
    """True for errors that mean PostgreSQL or Redis is unreachable (down, restarting, refusing
    connections): the request may succeed when retried, so it is answered 503, not 500."""
    from django.db import InterfaceError, OperationalError
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(error, (OperationalError, InterfaceError, BrokerError, RedisConnectionError, RedisTimeoutError))


SERVICE_UNAVAILABLE = "A service the hub depends on (database or Redis) is unavailable; retry shortly."
