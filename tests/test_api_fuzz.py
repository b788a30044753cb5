"""Fuzz the REST API from its own OpenAPI schema with schemathesis (a bounded run): whatever a
client sends, the answer is never a 5xx."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

pytestmark = pytest.mark.django_db

MAX_EXAMPLES = 25  # per operation: well under a minute on two cores for the whole API


@pytest.fixture
def api_schema(db):
    from django.core import signals
    from django.db import close_old_connections

    from hub.wsgi import application

    # As Django's test client does: requests inside the test's transaction keep its connection.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def auth_header(demo_bases, make_user) -> dict:
    """A signed-in caller (so writes get past authentication into validation) with a base model to name."""
    from hub.services.accounts import create_api_token

    return {"Authorization": "Token " + create_api_token(make_user("fuzzer"))}


def test_no_request_gets_a_server_error(api_schema, auth_header):
    # Each operation's cases are generated and called here (schemathesis' pytest fixture loader does
    # not run under this pytest); a failure is shrunk by Hypothesis and reported with its request.
    failures, calls = [], []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 25  # every v1 endpoint and method, as the schema lists them
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
        def never_a_server_error(case):
            response = case.call(headers=auth_header)
            calls.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.query or ''} {str(case.body)[:300]}: "
                f"{response.status_code} {response.text[:500]}")

        try:
            never_a_server_error()
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)
    assert len(calls) > 10 * len(operations)
