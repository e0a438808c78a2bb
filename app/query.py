"""Querying a memory with a text or an image (uni-modal search: text->captions, image->images)."""

from __future__ import annotations

from .errors import RecoError
from .store.base import Hit


def _open_image(image):
    """The query image, decoded in full now: a truncated or non-image file fails here, before a backbone loads."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise RecoError(f"query image {image} not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise RecoError(f"cannot read query image {image}: {exc} (is it a complete JPEG, PNG or WebP file?)") from exc


def query_memory(rt, name: str, *, text: str | None = None, image=None, k: int = 10,
                 version: int | None = None) -> list[Hit]:
    from .backbone import get_backbone
    from .memory import check_complete, resolve_collection

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecoError(f"-k must be a whole number of neighbours above 0, not {k!r}")
    if (text is None) == (image is None):
        raise RecoError("give exactly one of --text or --image")
    if text is not None and not text.strip():  # it would encode to some vector and answer k arbitrary hits
        raise RecoError("--text is empty: give the words to search the captions for")
    im = _open_image(image) if image is not None else None
    collection, v = resolve_collection(rt, name, version)
    check_complete(rt, name, collection, v)
    bb = get_backbone(v.backbone, rt.settings.device, rt.settings.offline)
    if text is not None:
        q, using = bb.encode_texts([text]), "text"
    else:
        q, using = bb.encode_images([im]), "image"
    return rt.store.search(collection, q, using=using, k=k)[0]
