"""Vector store: one interface (`VectorStore`), two backends (embedded qdrant-edge, Qdrant server)."""

from .base import MODALITIES, Hit, Storage, VectorStore, collection_name  # noqa: F401


def open_store(settings) -> VectorStore:
    """The backend the settings select: a Qdrant server when RECO_QDRANT_URL is set, else the embedded engine."""
    if settings.qdrant_url:
        from .server import ServerStore

        return ServerStore(settings.qdrant_url, api_key=settings.qdrant_api_key, oversampling=settings.oversampling,
                           search_threads=settings.search_threads)
    from .edge import EdgeStore

    return EdgeStore(settings.vectors_dir, oversampling=settings.oversampling, search_threads=settings.search_threads)
