"""Management commands: createtoken and the demo seed, used by scripts and `make run`."""
from __future__ import annotations

import io

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_createtoken_creates_the_user_and_a_working_token(client):
    out = io.StringIO()
    call_command("createtoken", "carol", stdout=out)
    token = out.getvalue().strip()
    assert len(token) >= 32
    from django.contrib.auth import get_user_model

    assert get_user_model().objects.filter(username="carol").exists()
    response = client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000/", HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 404  # authenticated (an anonymous call gets 401)
    assert client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000/",
                      HTTP_AUTHORIZATION="Token not-a-real-token").status_code == 401


def test_seed_demo_registers_every_catalog_entry_once(demo_files, settings, tmp_path):
    from hub.demo.builders import DEMO_ADAPTERS, DEMO_BASE_MODELS
    from hub.models import Adapter, BaseModel

    cache = str(demo_files["adapters"][0]["dir"].parent.parent)
    call_command("seed_demo", cache=cache, stdout=io.StringIO())
    call_command("seed_demo", cache=cache, stdout=io.StringIO())  # idempotent

    assert BaseModel.objects.count() == len(DEMO_BASE_MODELS)
    assert Adapter.objects.count() == len(DEMO_ADAPTERS)
    assert set(Adapter.objects.values_list("format", flat=True)) == {"peft", "kohya", "diffusers"}
    assert Adapter.objects.filter(use_dora=True).exists() and Adapter.objects.filter(use_rslora=True).exists()
