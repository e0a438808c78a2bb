"""Querying a memory with a text or an image (uni-modal search: text->captions, image->images)."""

from __future__ import annotations

from .store.base import Hit


def query_memory(rt, name: str, *, text: str | None = None, image=None, k: int = 10,
                 version: int | None = None) -> list[Hit]:
    from PIL import Image

    from .backbone import get_backbone
    from .memory import check_complete, resolve_collection

    collection, v = resolve_collection(rt, name, version)
    check_complete(rt, name, collection, v)
    bb = get_backbone(v.backbone, rt.settings.device, rt.settings.offline)
    if text is not None:
        q, using = bb.encode_texts([text]), "text"
    else:
        im = image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
        q, using = bb.encode_images([im]), "image"
    return rt.store.search(collection, q, using=using, k=k)[0]
