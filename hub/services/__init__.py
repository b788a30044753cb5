"""Writes. Views, serializers and Celery tasks call these; they hold the rules."""
