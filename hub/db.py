"""Per-connection PostgreSQL settings (connected in HubConfig.ready), and statements compiled once
for the hot read paths (KeptStatement)."""
from __future__ import annotations

import threading
from typing import Callable

from django.conf import settings
from django.db.models import QuerySet


def configure_connection(sender, connection, **kwargs):
    """pgvector ≥ 0.8 iterative scans: with a WHERE clause (visibility, base model,
    filters) an HNSW scan continues until it has enough visible rows instead of
    returning fewer; ef_search trades recall for latency."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET hnsw.iterative_scan = relaxed_order")
            cursor.execute("SET hnsw.ef_search = %s", [int(settings.QUIVER_HNSW_EF_SEARCH)])


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
            build(**{slot: pair[which] for slot, pair in stand_ins.items()}).query.sql_with_params()
            for which in (0, 1)]
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
