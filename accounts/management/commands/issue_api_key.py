from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.actions import do_issue_api_key
from accounts.models import User


class Command(BaseCommand):
    help = "Print a new REST API key for USERNAME (the key is the last word of the output)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="a label for the key")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = User.objects.get(username=options["username"])
        except User.DoesNotExist:
            raise CommandError(
                f"No user named {options['username']!r}. Create it first "
                "(python manage.py createsuperuser) or check the spelling."
            ) from None
        _, key = do_issue_api_key(user, name=options["name"])
        self.stdout.write(f"API key for {user.username} (shown once): {key}")
