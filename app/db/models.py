"""Metadata schema. The vector store holds vectors; this holds what they are and how they got there.

Every change here is one new Alembic migration under migrations/versions.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class VersionStatus:
    BUILDING = "building"
    FINALIZING = "finalizing"
    READY = "ready"
    RETIRED = "retired"
    FAILED = "failed"
    ACTIVATABLE = (READY, RETIRED)


class ShardStatus:
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ModelStatus:
    TRAINING = "training"
    READY = "ready"
    FAILED = "failed"


class Memory(Base):
    __tablename__ = "memories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    # "memory" (image-text pairs) or "classes" (a class set: one point per class); one namespace for both
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="memory", server_default="memory")
    active_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("memory_versions.id", use_alter=True, name="fk_memories_active_version", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list["MemoryVersion"]] = relationship(
        back_populates="memory", foreign_keys="MemoryVersion.memory_id", order_by="MemoryVersion.version"
    )


class MemoryVersion(Base):
    __tablename__ = "memory_versions"
    __table_args__ = (UniqueConstraint("memory_id", "version", name="uq_memory_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    memory_id: Mapped[int] = mapped_column(ForeignKey("memories.id", ondelete="CASCADE"), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=VersionStatus.BUILDING)
    backbone: Mapped[str] = mapped_column(Text, nullable=False)  # canonical spec string
    backbone_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 of weights/config, when files
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    source_format: Mapped[str] = mapped_column(String(16), nullable=False)
    collection: Mapped[str] = mapped_column(String(128), nullable=False)
    # storage options as asked for (`--quantization`, `--on-disk`); the store reports what it applied
    quantization: Mapped[str] = mapped_column(String(8), nullable=False, default="none", server_default="none")
    on_disk: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    items_stored: Mapped[int] = mapped_column(Integer, default=0)
    items_skipped: Mapped[int] = mapped_column(Integer, default=0)
    # a class set's provenance: templates, the model and memory version that refined it, the names file's hash
    details: Mapped[dict | None] = mapped_column(JSON)
    activate_when_ready: Mapped[int] = mapped_column(Integer, default=0)
    # a delta version: the version it copied (its lineage: what it added, removed and updated is in `details`)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    # points deleted in place by takedowns (`reco memory forget --all-versions`) since the version was built: the
    # store holds its shards' items minus these
    items_forgotten: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    memory: Mapped[Memory] = relationship(back_populates="versions", foreign_keys=[memory_id])
    shards: Mapped[list["IngestShard"]] = relationship(
        back_populates="version", order_by="IngestShard.index", cascade="all, delete-orphan"
    )


class IngestShard(Base):
    __tablename__ = "ingest_shards"
    __table_args__ = (
        UniqueConstraint("version_id", "index", name="uq_shard_index"),
        Index("ix_ingest_shards_version_status", "version_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("memory_versions.id", ondelete="CASCADE"), nullable=False)
    index: Mapped[int] = mapped_column(Integer, nullable=False)
    spec: Mapped[dict] = mapped_column(JSON, nullable=False)  # what the reader needs to find this shard
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=ShardStatus.PENDING)
    items_stored: Mapped[int] = mapped_column(Integer, default=0)
    items_skipped: Mapped[int] = mapped_column(Integer, default=0)
    skip_reasons: Mapped[dict] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the lease (app/leases.py): who holds the shard and when it last said so; when it was last put on a queue
    worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    version: Mapped[MemoryVersion] = relationship(back_populates="shards")


class TakedownStatus:
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Takedown(Base):
    """Keys taken out of a memory (`reco memory forget`): into a new delta version (scope `version`), or also
    deleted in place from every existing version (scope `all-versions`; later builds and exports of the memory
    leave them out). `progress` records, per version number, the points matched and whether they are gone, so an
    interrupted takedown resumes where it stopped."""

    __tablename__ = "takedowns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    memory_id: Mapped[int] = mapped_column(ForeignKey("memories.id", ondelete="CASCADE"), nullable=False)
    scope: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    keys_count: Mapped[int] = mapped_column(Integer, nullable=False)
    keys_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=TakedownStatus.RUNNING)
    progress: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    new_version: Mapped[int | None] = mapped_column(Integer)  # the delta version it built (scope `version`)
    points_removed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    caches_dropped: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    keys: Mapped[list["TakedownKey"]] = relationship(cascade="all, delete-orphan")


class TakedownKey(Base):
    __tablename__ = "takedown_keys"
    __table_args__ = (Index("ix_takedown_keys_key", "key"),)

    takedown_id: Mapped[int] = mapped_column(ForeignKey("takedowns.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(512), primary_key=True)


class Worker(Base):
    """A live `reco worker` renews its row every lease period from a thread of its own, so a worker busy with a
    long shard (which cannot answer a broker ping) still counts as alive."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[str] = mapped_column(String(255), nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FusionModel(Base):
    """A trained RECO model: fusion weights on disk (safetensors + JSON), provenance here."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=ModelStatus.TRAINING)
    backbone: Mapped[str] = mapped_column(Text, nullable=False)
    backbone_hash: Mapped[str | None] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    memory_name: Mapped[str] = mapped_column(String(64), nullable=False)  # what inference follows by default
    memory_version: Mapped[int] = mapped_column(Integer, nullable=False)  # what it was trained with
    pairs_name: Mapped[str] = mapped_column(String(64), nullable=False)
    pairs_version: Mapped[int] = mapped_column(Integer, nullable=False)
    config: Mapped[dict] = mapped_column(JSON, nullable=False)
    checkpoint_dir: Mapped[str] = mapped_column(Text, nullable=False)
    step: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    metrics: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Evaluation(Base):
    """One evaluation run: frozen baseline and RECO side by side; the full result is a JSON file."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(32), nullable=False)  # zeroshot_classification | zeroshot_retrieval
    model_name: Mapped[str] = mapped_column(String(64), nullable=False)
    memory_name: Mapped[str] = mapped_column(String(64), nullable=False)
    memory_version: Mapped[int] = mapped_column(Integer, nullable=False)
    dataset: Mapped[str] = mapped_column(Text, nullable=False)
    dataset_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    ks: Mapped[list] = mapped_column(JSON, nullable=False)
    retrieval: Mapped[str] = mapped_column(String(16), nullable=False)
    leakage_guard: Mapped[int] = mapped_column(Integer, nullable=False)
    metrics: Mapped[dict] = mapped_column(JSON, nullable=False)
    timing: Mapped[dict] = mapped_column(JSON, nullable=False)
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    result_path: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
