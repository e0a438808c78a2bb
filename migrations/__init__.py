"""Alembic migrations for the RECO metadata DB, shipped with the package (`reco db upgrade`)."""
