from django.core.management.base import BaseCommand

from hub.services.analysis import request_missing_analyses


class Command(BaseCommand):
    help = "Queue the analysis (spectra and adapter-page plots) of every revision that has no plots yet."

    def handle(self, **options):
        self.stdout.write(f"queued {request_missing_analyses()} analysis job(s)")
