"""Rate limits: DRF throttling with counters in Redis (the Django cache), per address and per user."""
import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture
def low_rates(settings):
    from django.core.cache import cache

    cache.clear()  # counters of earlier tests
    settings.QUIVER_THROTTLE_RATES = {"anon": "2/minute", "user": "3/minute"}
    yield settings.QUIVER_THROTTLE_RATES
    cache.clear()


def test_anonymous_clients_get_429_with_a_json_error_past_their_rate(low_rates, client_for):
    anonymous = client_for(None)
    statuses = [anonymous.get("/api/v1/adapters/").status_code for _ in range(3)]

    assert statuses == [200, 200, 429]
    refused = anonymous.get("/api/v1/search?q=anything")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "throttled" and "throttled" in error["message"].lower()
    assert int(refused["Retry-After"]) > 0
    assert client_for(None).get("/api/v1/health").status_code == 200  # probes are never throttled
    import redis
    from django.conf import settings

    # One counter per anonymous address, not a second one under the users' scope.
    assert redis.Redis.from_url(settings.REDIS_URL).keys("*throttle_user*") == []


def test_each_user_has_their_own_budget_kept_in_redis(low_rates, make_user, client_for):
    import redis
    from django.conf import settings

    alice, bob = client_for(make_user("alice")), client_for(make_user("bob"))
    assert [alice.get("/api/v1/adapters/").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert bob.get("/api/v1/adapters/").status_code == 200  # alice's requests did not use bob's budget
    # The counters live in Redis, shared by every web worker process.
    keys = redis.Redis.from_url(settings.REDIS_URL).keys("*throttle_user*")
    assert len(keys) == 2
