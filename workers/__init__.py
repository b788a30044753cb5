"""Celery app and tasks. Tasks are thin: they take ids and call hub services."""
from workers.celery_app import app

__all__ = ["app"]
