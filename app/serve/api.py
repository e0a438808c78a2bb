"""`reco serve`: RECO over HTTP (FastAPI + uvicorn).

Routes: POST /v1/embed, /v1/classify, /v1/search; GET /v1/models, /v1/memories, /healthz, /readyz, /metrics, and
the search page at /. Requests carry images as multipart uploads or base64 in JSON. Every answer that read a
memory names its version, in the body (`memory`) and in the `X-Reco-Memory` header. Bad requests get a 4xx
JSON `{"error": ...}` that says what to fix; nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import NotFound, RecoError
from ..runtime import Runtime
from .engine import BackboneMismatch, ServedModel
from .metrics import ServeMetrics
from .settings import ServeSettings

log = logging.getLogger("reco.serve")
PAGE = Path(__file__).with_name("page.html")
MEMORY_HEADER = "X-Reco-Memory"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- request bodies ----------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="A served model (default: the only one, or the first listed)")
    images: list[str] = Field(default_factory=list, description="base64 images (JSON); multipart sends files")


class EmbedRequest(_Body):
    texts: list[str] = Field(default_factory=list)
    refine_image: bool = Field(True, description="Refine image embeddings with the memory (False: frozen CLIP)")
    refine_text: bool = True
    frozen: bool = Field(False, description="Also return the frozen embeddings")


class ClassifyRequest(_Body):
    classes: list[str] = Field(description="Class names, at least one")
    templates: list[str] | None = Field(None, description="Prompt templates with {c} (default: the built-in set)")
    top_k: int = Field(5, ge=1)
    compare: bool = Field(False, description="Also return the frozen baseline's labels")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        if not v or any(not c.strip() for c in v):
            raise ValueError("give at least one class name, none of them empty")
        return v

    @field_validator("templates")
    @classmethod
    def _templates(cls, v):
        if v is not None and (not v or any("{c}" not in t for t in v)):
            raise ValueError("every template needs {c} where the class name goes, e.g. 'a photo of a {c}.'")
        return v


class SearchRequest(_Body):
    text: str | None = None
    memory: str | None = Field(None, description="NAME or NAME@VERSION (default: the model's memory)")
    k: int = Field(10, ge=1)
    thumbnails: bool = Field(False, description="Inline each hit's image as a data: URI when it can be read")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ())) or "body"
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _openapi(schema: type[BaseModel]) -> dict:
    body = schema.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body},
                                                           "multipart/form-data": {"schema": body}}}}


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(settings: ServeSettings | None = None, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or ServeSettings.from_env()
    metrics = ServeMetrics()
    state: dict = {"models": {}, "ready": False, "error": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = runtime or Runtime()
        state["rt"] = rt
        try:
            names = list(settings.models) or await run_in_threadpool(_ready_models, rt)
            for name in names:
                state["models"][name] = await run_in_threadpool(ServedModel, name, rt, settings, metrics)
            state["ready"] = bool(state["models"])
            if not names:
                state["error"] = "no ready model to serve: train one with `reco train`"
            log.info("serving %s", ", ".join(names) or "no model")
            yield
        finally:
            for m in state["models"].values():
                await m.stop()
            if runtime is None:
                rt.close()

    app = FastAPI(title="RECO", version="1", lifespan=lifespan,
                  description="Retrieval-enhanced CLIP: refined embeddings, zero-shot labels and memory search.")
    app.state.reco = state
    app.state.metrics = metrics
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # nothing else caught it: a 500 without a traceback
            log.exception("unexpected error on %s", request.url.path)
            response = _error(500, f"internal error ({type(exc).__name__}); the server log has the details")
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(path).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path} (see /docs)",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, msg)

    @app.exception_handler(RecoError)
    async def _reco_error(request, exc: RecoError):
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, BackboneMismatch) else 503
        return _error(status, str(exc))

    def _authorize(request: Request) -> None:
        if settings.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.token.encode()):
            raise ApiError(401, "missing or wrong bearer token: send `Authorization: Bearer <RECO_API_TOKEN>`")

    def _model(name: str | None) -> ServedModel:
        models = state["models"]
        if not models:
            raise ApiError(503, state["error"] or "the models are still loading; retry shortly (GET /readyz)")
        if name is None:
            return next(iter(models.values()))
        if name not in models:
            raise ApiError(404, f"no model {name!r} is served here; served: {', '.join(models)} (GET /v1/models)")
        return models[name]

    async def _parse(request: Request, schema: type[_Body]) -> tuple[_Body, list[bytes]]:
        _authorize(request)
        length = request.headers.get("content-length")
        limit = settings.max_items * settings.max_image_bytes + (1 << 20)
        if length and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {int(length)} bytes is over the {limit}-byte limit "
                                f"({settings.max_items} images of at most {settings.max_image_bytes} bytes)")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            data, raw = await _read_form(request, schema)
        else:
            body = await request.body()
            try:
                data = json.loads(body or b"{}")
            except ValueError as exc:
                raise ApiError(400, f"the body is not valid JSON ({exc}); send a JSON object or a multipart "
                                    "form") from exc
            if not isinstance(data, dict):
                raise ApiError(400, "the JSON body must be an object, e.g. {\"texts\": [\"a red circle\"]}")
            raw = None
        try:
            req = schema.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, _validation_message(exc)) from exc
        if raw is None:
            raw = [_b64(s, i) for i, s in enumerate(req.images)]
        if len(raw) > settings.max_items:
            raise ApiError(413, f"{len(raw)} images in one request; at most {settings.max_items} "
                                "(RECO_SERVE_MAX_ITEMS): split the request")
        for i, blob in enumerate(raw):
            if len(blob) > settings.max_image_bytes:
                raise ApiError(413, f"image {i} is {len(blob)} bytes, over the {settings.max_image_bytes}-byte "
                                    "limit (RECO_SERVE_MAX_IMAGE_BYTES): send it smaller")
        return req, raw

    async def _read_form(request: Request, schema: type[_Body]) -> tuple[dict, list[bytes]]:
        from starlette.datastructures import UploadFile

        try:
            form = await request.form(max_files=settings.max_items + 1, max_fields=10_000)
        except Exception as exc:
            raise ApiError(400, f"cannot read the multipart form: {exc}") from exc
        lists = {"texts", "classes", "templates"} & set(schema.model_fields)  # fields given once per value
        data: dict = {}
        raw: list[bytes] = []
        for key in dict.fromkeys(form.keys()):
            values = form.getlist(key)
            if key == "images":
                for v in values:
                    raw.append(await v.read() if isinstance(v, UploadFile) else str(v).encode())
            elif key in lists:
                data[key] = [str(v) for v in values]
            else:
                data[key] = str(values[-1])
        return data, raw

    async def _images(model: ServedModel, raw: list[bytes]):
        images = [_decode(blob, i) for i, blob in enumerate(raw)]
        return await run_in_threadpool(model.preprocess, images)

    def _answer(body: dict, memory: tuple[str, int]) -> JSONResponse:
        body = {"memory": {"name": memory[0], "version": memory[1]}, **body}
        return JSONResponse(body, headers={MEMORY_HEADER: f"{memory[0]}@{memory[1]}"})

    # -- routes -----------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return _error(503, state["error"] or "loading models")
        try:
            await asyncio.gather(*(m.check() for m in state["models"].values()))
        except Exception as exc:
            return _error(503, f"not ready: {exc}")
        return {"status": "ready", "models": list(state["models"])}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        _authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request)
        out = []
        for m in state["models"].values():
            row = m.describe()
            collection_version = await run_in_threadpool(_active_version, state["rt"], m.encoder.memory)
            # "search" is the search modality (uni/cross); where the searches run is "search_runs"
            search_runs = await run_in_threadpool(m.search_runs)
            out.append({**row, "memory_version": collection_version, "search_runs": search_runs})
        return {"models": out}

    @app.get("/v1/memories")
    async def memories(request: Request):
        from ..memory import list_memories

        _authorize(request)
        out = []
        for mem in await run_in_threadpool(list_memories, state["rt"]):
            active = next((v for v in mem["versions"] if v["active"]), None)
            out.append({"name": mem["name"], "active_version": active["version"] if active else None,
                        "backbone": active["backbone"] if active else None,
                        "items": active["items_stored"] if active else None,
                        "versions": [v["version"] for v in mem["versions"]]})
        return {"memories": out}

    @app.post("/v1/embed", openapi_extra=_openapi(EmbedRequest))
    async def embed(request: Request):
        req, raw = await _parse(request, EmbedRequest)
        if not raw and not req.texts:
            raise ApiError(422, "give at least one image or text")
        if len(req.texts) > settings.max_items:
            raise ApiError(413, f"{len(req.texts)} texts in one request; at most {settings.max_items} "
                                "(RECO_SERVE_MAX_ITEMS): split the request")
        model = _model(req.model)
        pixels = await _images(model, raw) if raw else None
        for _ in range(3):  # images and texts from one version: a swap between their batches runs both again
            jobs = []
            if raw:
                jobs.append(model.embed("image", pixels, len(raw), req.refine_image))
            if req.texts:
                jobs.append(model.embed("text", req.texts, len(req.texts), req.refine_text))
            done = await asyncio.gather(*jobs)
            if len({d.version for d in done}) == 1:
                break
        else:
            raise ApiError(503, "the memory was swapped during the request three times running; retry")
        body: dict = {"model": model.name, "dim": model.describe()["dim"]}
        sides = (["image"] if raw else []) + (["text"] if req.texts else [])
        for side, d in zip(sides, done):
            refine = req.refine_image if side == "image" else req.refine_text
            rows = d.refined if refine else d.frozen
            body[f"{side}s"] = [{"embedding": r.tolist(), **({"frozen": f.tolist()} if req.frozen else {})}
                                for r, f in zip(rows, d.frozen)]
            body.setdefault("refined", {})[side] = bool(refine)
        return _answer(body, (done[0].memory, done[0].version))

    @app.post("/v1/classify", openapi_extra=_openapi(ClassifyRequest))
    async def classify(request: Request):
        from ..datasets import templates_for

        req, raw = await _parse(request, ClassifyRequest)
        if not raw:
            raise ApiError(422, "give at least one image to classify")
        if len(req.classes) > settings.max_classes:
            raise ApiError(413, f"{len(req.classes)} classes; at most {settings.max_classes} (RECO_SERVE_MAX_CLASSES)")
        templates = req.templates or templates_for("default")
        if len(templates) > settings.max_templates:
            raise ApiError(413, f"{len(templates)} templates; at most {settings.max_templates} "
                                "(RECO_SERVE_MAX_TEMPLATES)")
        if req.top_k > len(req.classes):
            raise ApiError(422, f"top_k: {req.top_k} is more than the {len(req.classes)} classes given")
        model = _model(req.model)
        img = await model.embed("image", await _images(model, raw), len(raw), True)
        w_frozen, w_reco = await model.class_weights(req.classes, templates, img.collection)
        scale = model.logit_scale
        results = []
        for i in range(len(raw)):
            row = {"reco": _top(img.refined[i] @ w_reco.T, req.classes, req.top_k, scale)}
            if req.compare:
                row["baseline"] = _top(img.frozen[i] @ w_frozen.T, req.classes, req.top_k, scale)
            results.append(row)
        return _answer({"model": model.name, "results": results}, (img.memory, img.version))

    @app.post("/v1/search", openapi_extra=_openapi(SearchRequest))
    async def search(request: Request):
        from ..corpus import read_source_images
        from ..report import data_uri
        from ..train import parse_memory_ref

        req, raw = await _parse(request, SearchRequest)
        if (req.text is None) == (not raw):
            raise ApiError(422, "give exactly one query: a text or one image")
        if len(raw) > 1:
            raise ApiError(422, f"one query image per search, not {len(raw)}")
        if req.k > settings.max_k:
            raise ApiError(422, f"k: {req.k} is over the limit of {settings.max_k} (RECO_SERVE_MAX_K)")
        if req.memory:
            try:
                parse_memory_ref(req.memory)
            except RecoError as exc:
                raise ApiError(422, f"memory: {exc}") from exc
        model = _model(req.model)
        if raw:
            side, query = "image", await model.embed("image", await _images(model, raw), 1, False)
        else:
            side, query = "text", await model.embed("text", [req.text], 1, False)
        hits, used = await model.search(side, query, req.memory, req.k)
        thumbs = {}
        if req.thumbnails:
            images = await run_in_threadpool(read_source_images, {i: h.payload.get("src") for i, h in
                                                                  enumerate(hits)})
            thumbs = {i: data_uri(im, 128) for i, im in images.items() if im is not None}
        out = [{"key": h.payload.get("key"), "caption": h.payload.get("caption"), "score": round(h.score, 6),
                "shard": h.payload.get("shard"), "source": h.payload.get("src"),
                **({"thumbnail": thumbs[i]} if i in thumbs else {})} for i, h in enumerate(hits)]
        return _answer({"model": model.name, "query": side, "hits": out}, used)

    return app


# -- helpers ------------------------------------------------------------------------------------------------------
def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _b64(s: str, i: int) -> bytes:
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"images.{i} is not valid base64 ({exc})") from exc


def _decode(blob: bytes, i: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"image {i} has too many pixels to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ApiError(400, f"image {i} is not an image: send JPEG, PNG, WebP, GIF or BMP bytes") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, f"image {i} cannot be decoded ({exc}): is the file complete?") from exc


def _top(logits: np.ndarray, classes: list[str], k: int, scale: float) -> list[dict]:
    z = scale * logits
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-logits, kind="stable")[:k]
    return [{"label": classes[j], "score": round(float(logits[j]), 6), "probability": round(float(p[j]), 6)}
            for j in order]


def _ready_models(rt) -> list[str]:
    from ..db.models import FusionModel, ModelStatus

    with rt.db.session() as s:
        return [m.name for m in s.query(FusionModel).filter_by(status=ModelStatus.READY).order_by(FusionModel.name)]


def _active_version(rt, memory: str) -> int | None:
    from ..memory import get_version

    with rt.db.session() as s:
        try:
            return get_version(s, memory, None, active=True).version
        except RecoError:
            return None


def app_from_env() -> FastAPI:
    """uvicorn's factory for `reco serve --workers N`: each worker process builds its app from the environment."""
    return create_app(ServeSettings.from_env())
