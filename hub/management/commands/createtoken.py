from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from hub.services.accounts import create_api_token


class Command(BaseCommand):
    help = "Create the user if needed and print a new API token for it (Authorization: Token <key>)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--staff", action="store_true", help="make the user staff (may write to any namespace)")

    def handle(self, username, staff, **options):
        user, _ = get_user_model().objects.get_or_create(username=username)
        if staff and not user.is_staff:
            user.is_staff = True
            user.save(update_fields=["is_staff"])
        self.stdout.write(create_api_token(user, description="createtoken"))
