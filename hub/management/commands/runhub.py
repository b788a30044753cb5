"""`make run`: migrate, seed the demo registry if empty, then run the web server
and a Celery worker until Ctrl-C, and stop everything (embedded servers too)."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from hub import embedded
from generation.zoo.build import ZOO_BASE_NAME, ZOO_NAMESPACE
from hub.models import Adapter, GeneratorArtifact


class Command(BaseCommand):
    help = "Run the hub (web + worker) on this machine, with a demo registry."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1:8000")
        parser.add_argument("--no-demo", action="store_true", help="do not seed the demo registry")
        parser.add_argument("--no-zoo", action="store_true",
                            help="do not build the small LoRA zoo and its generators in the background")

    def handle(self, bind, no_demo, no_zoo, **options):
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        password = self._admin_password()
        if not no_demo and not Adapter.objects.exists():
            self.stdout.write("Seeding the demo registry (first run only)...")
            call_command("seed_demo")
        python = sys.executable
        children = [
            # --quiet: no banner, so the address and login below are the last thing printed
            subprocess.Popen([python, "-m", "celery", "--quiet", "-A", "workers", "worker",
                              "--queues", "default,embed,gpu", "--concurrency", "2", "--loglevel", "WARNING"]),
            subprocess.Popen([python, "-m", "gunicorn", "hub.wsgi:application", "--bind", bind,
                              "--workers", "2", "--threads", "4", "--timeout", "600", "--access-logfile", "-"]),
        ]
        if not no_demo and not no_zoo and not GeneratorArtifact.objects.filter(base_model__namespace=ZOO_NAMESPACE).exists():
            # Generation needs experts and trained generators: a few minutes of training the web
            # need not wait for. The build resumes if interrupted; a later run skips it.
            log = open(settings.VAR_DIR / "zoo-demo.log", "w")
            children.append(subprocess.Popen(
                ["sh", "-c", f"{python} manage.py build_zoo --size small && "
                             f"{python} manage.py train_generators {ZOO_NAMESPACE}/{ZOO_BASE_NAME}"],
                stdout=log, stderr=subprocess.STDOUT))
            self.stdout.write(f"Building the small LoRA zoo and its generators in the background "
                              f"(generation is available in a few minutes; log: {log.name})")
        url = f"http://{bind}"
        self._wait_until_serving(url, children[1])
        self.stdout.write(self.style.SUCCESS(
            f"\nQuiver is running at {url}/\n"
            f"  API:        {url}/api/v1/adapters/\n"
            f"  API docs:   {url}/api/docs/\n"
            f"  Admin:      {url}/admin/  (login: admin / {password})\n"
            f"  API token:  python manage.py createtoken <username>\n"
            "Press Ctrl-C to stop.\n"
        ))
        stop = {"now": False}
        signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"] and all(child.poll() is None for child in children[:2]):
                time.sleep(0.5)
        finally:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            for child in children:
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
            if os.environ.get("QUIVER_EMBEDDED") == "1":
                embedded.stop_all()
            self.stdout.write("Stopped.")

    def _wait_until_serving(self, url: str, web: subprocess.Popen, timeout: float = 120) -> None:
        """Return once the web server answers its health check (so the address is printed after the
        servers' start-up lines, and works when printed), or it exited, or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and web.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/api/v1/health", timeout=5):
                    return
            except (OSError, ValueError):  # not listening yet, or 503 while a backend starts
                time.sleep(0.5)

    def _admin_password(self) -> str:
        """The admin login for this checkout: created once, kept under var/."""
        password_file = settings.VAR_DIR / "admin_password"
        User = get_user_model()
        if not password_file.exists() or not User.objects.filter(username="admin").exists():
            password = secrets.token_urlsafe(12)
            admin, _ = User.objects.get_or_create(username="admin", defaults={"is_staff": True, "is_superuser": True})
            admin.is_staff = admin.is_superuser = True
            admin.set_password(password)
            admin.save()
            password_file.write_text(password)
            password_file.chmod(0o600)
        return password_file.read_text().strip()
