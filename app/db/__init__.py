"""Metadata database: SQLAlchemy models, engine/session helpers, Alembic upgrade."""

from .models import Base, Evaluation, FusionModel, IngestShard, Memory, MemoryVersion  # noqa: F401
from .session import Database  # noqa: F401
