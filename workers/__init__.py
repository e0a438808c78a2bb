"""Celery app and tasks: the distributed profile's workers (`reco worker --queues ingest`)."""
