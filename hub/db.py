"""Per-connection PostgreSQL settings (connected in HubConfig.ready), a second connection for a
statement run beside Django's (SideConnection), and statements compiled once for the hot read
paths (KeptStatement)."""
from __future__ import annotations

import os
import select
import threading
from typing import Callable

import psycopg
from django.conf import settings
from django.db import connection as django_connection
from django.db.models import QuerySet
from psycopg import pq


def configure_connection(sender, connection, **kwargs):
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            configure_session(cursor)
    # A new Django connection in this thread (a reconnection after a database restart, or another
    # database: the test runner's) ends the side connection opened beside the old one.
    drop_side_connection()


def configure_session(cursor) -> None:
    """pgvector ≥ 0.8 iterative scans: with a WHERE clause (visibility, base model,
    filters) an HNSW scan continues until it has enough visible rows instead of
    returning fewer; ef_search trades recall for latency."""
    cursor.execute("SET hnsw.iterative_scan = relaxed_order")
    cursor.execute("SET hnsw.ef_search = %s", [int(settings.QUIVER_HNSW_EF_SEARCH)])


class SideConnection:
    """A second connection of this process and thread to the database, for one statement sent
    ahead while Django's connection runs another: PostgreSQL runs them in two backends at once
    (a search's two HNSW scans; the web process only waits for them, so the second core would
    otherwise sit idle). Autocommit and outside Django's transactions, so `side_connection()` offers
    it only while Django's connection is in none (it could not see that transaction's rows).

    Plain libpq calls through psycopg's `pq` layer (send, then wait for the result), so no thread is
    needed; an error here only closes this connection, and the caller runs its statement on
    Django's connection instead."""

    def __init__(self):
        self.pid = os.getpid()  # a forked child never uses its parent's socket
        self.conn = psycopg.connect(**django_connection.get_connection_params(), autocommit=True)
        with self.conn.cursor() as cursor:
            configure_session(cursor)
        self.pending = False

    def usable(self) -> bool:
        return self.pid == os.getpid() and not self.conn.closed and not self.pending

    def send(self, sql: str, params: list) -> None:
        """Send `sql` (several statements may share it) with its parameters bound client-side."""
        query = psycopg.ClientCursor(self.conn).mogrify(sql, params).encode()
        pgconn = self.conn.pgconn
        pgconn.send_query(query)
        self.pending = True
        while pgconn.flush():  # nonblocking: the rest of the query waits for the socket
            select.select([], [pgconn.socket], [])

    def results(self) -> list:
        """The results of what was sent (one per statement), once PostgreSQL has answered."""
        pgconn = self.conn.pgconn
        pgconn.consume_input()
        while pgconn.is_busy():
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
        results = []
        while (result := pgconn.get_result()) is not None:
            if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                raise psycopg.OperationalError(result.error_message.decode(errors="replace"))
            results.append(result)
        self.pending = False
        return results

    def close(self) -> None:
        if self.pid == os.getpid():
            self.conn.close()


_side = threading.local()


def side_connection() -> SideConnection | None:
    """This thread's side connection (opened at first use), or None while Django's connection is in a
    transaction."""
    if django_connection.in_atomic_block:
        return None
    side = getattr(_side, "connection", None)
    if side is None or not side.usable():
        if side is not None:
            side.close()
        _side.connection = side = SideConnection()
    return side


def drop_side_connection() -> None:
    """Close this thread's side connection (after an error, or when Django's is replaced); the next
    use opens another."""
    side = getattr(_side, "connection", None)
    _side.connection = None
    if side is not None:
        try:
            side.close()
        except psycopg.Error:
            pass


class KeptStatement:
    """A queryset's SQL and parameters, compiled by the ORM once, with slots for the values that
    change from one run to the next. Building and compiling a statement of joins and subqueries
    costs ≈ 1–2 ms of the web's CPU, as much as PostgreSQL takes to run it; on a hot path the shape
    (who asks, which filters) repeats, so later runs only put their values in the slots. The ORM
    stays the one spelling of the statement: this only keeps its output.

    `build(**values)` returns the queryset; `stand_ins` gives each slot two distinct stand-in values
    (compiled in place of real ones and found again among the compiled parameters: a slot must
    change with its stand-in and nothing else may); `as_param` says, per slot, how a value appears
    among the compiled parameters when not as itself. Relies on Django's default client-side
    parameter binding (psycopg's ClientCursor), which also lets several statements share one query."""

    def __init__(self, build: Callable[..., QuerySet], stand_ins: dict[str, tuple], as_param: dict | None = None):
        as_param = as_param or {}

        def compiled_stand_ins(which: int) -> dict:
            return {slot: as_param.get(slot, _as_is)(pair[which]) for slot, pair in stand_ins.items()}

        (self.sql, first), (second_sql, second) = [
            build(**{slot: pair[which] for slot, pair in stand_ins.items()}).query.sql_with_params() for which in (0, 1)]
        self.params = list(first)
        self.slots = {slot: [i for i, param in enumerate(first) if param == value]
                      for slot, value in compiled_stand_ins(0).items()}
        # A value the slots missed (or one inlined into the SQL) differs between the two compilations.
        if second_sql != self.sql or list(second) != self.params_with(**compiled_stand_ins(1)):
            raise RuntimeError("a kept statement's SQL depends on more than its slots")

    def params_with(self, **values) -> list:
        """The parameters with each slot's value (as it appears among compiled parameters) put in."""
        params = list(self.params)
        for slot, value in values.items():
            for i in self.slots[slot]:
                params[i] = value
        return params


def _as_is(value):
    return value


class KeptStatements:
    """Kept statements by shape, per process. Shapes are few (each filter combination, and one
    visibility scope per signed-in user); past the bound the dictionary starts again rather than
    growing with the user count."""

    def __init__(self, bound: int = 1024):
        self.bound, self.kept, self.lock = bound, {}, threading.Lock()

    def get(self, key: tuple, make: Callable[[], object]):
        statement = self.kept.get(key)
        if statement is None:
            statement = make()
            with self.lock:
                if len(self.kept) >= self.bound:
                    self.kept.clear()
                self.kept[key] = statement
        return statement
