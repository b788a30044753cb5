"""Rate limits (DRF throttling; counters in the Django cache, i.e. Redis, so every web worker
shares them). Rates are read from settings.QUIVER_THROTTLE_RATES at request time, so they come
from the environment (QUIVER_THROTTLE_ANON, QUIVER_THROTTLE_USER) and tests can change them."""
from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle


class SettingsRateMixin:
    def get_rate(self):
        return settings.QUIVER_THROTTLE_RATES.get(self.scope)


class AnonymousRateThrottle(SettingsRateMixin, AnonRateThrottle):
    """Per client address, for requests without a token or session."""


class PerUserRateThrottle(SettingsRateMixin, UserRateThrottle):
    """Per signed-in user (token or session). Anonymous requests are AnonymousRateThrottle's alone:
    DRF's UserRateThrottle would count them a second time by address, two more Redis round trips
    per anonymous request for a limit the stricter anonymous one already enforces."""

    def get_cache_key(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return None
        return super().get_cache_key(request, view)
