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
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import NotFound, RecoError
from ..runtime import Runtime
from .engine import BackboneMismatch, Refused, ServedModel
from .metrics import ServeMetrics
from .settings import ServeSettings

log = logging.getLogger("reco.serve")
PAGE = Path(__file__).with_name("page.html")
MEMORY_HEADER = "X-Reco-Memory"
MAX_VERSION = 2**31 - 1  # versions are 32-bit integers in the database (PostgreSQL's `integer`)
MEMORY_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}(@[1-9][0-9]{0,8})?$"
INLINE_JSON_BYTES = 256 * 1024  # bodies above this are parsed on a worker thread, not on the event loop
READY_TIMEOUT_S = 10.0  # /readyz waits this long for a model thread busy with a batch


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
    texts: list[str] = Field(default_factory=list, description="At least one image or one text")
    refine_image: bool = Field(True, description="Refine image embeddings with the memory (False: frozen CLIP)")
    refine_text: bool = True
    frozen: bool = Field(False, description="Also return the frozen embeddings")


class ClassifyRequest(_Body):
    classes: list[str] = Field(description="Class names, at least one")
    templates: list[str] | None = Field(None, description="Prompt templates with {c} (default: the built-in set); "
                                                          "classes x templates is at most RECO_SERVE_MAX_PROMPTS")
    top_k: int = Field(5, ge=1, description="Labels per image; more than the classes given returns them all")
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
    text: str | None = Field(None, description="A text query, or one image")
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


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong and what to fix")


_ERRORS = {400: "malformed JSON or form, invalid base64, bytes that are no image",
           401: "missing or wrong bearer token (when RECO_API_TOKEN is set)",
           404: "unknown model or memory", 408: "the body took longer than RECO_SERVE_BODY_TIMEOUT_S to arrive",
           409: "a memory of another backbone, or a version not ready", 413: "over one of the service's size limits (RECO_SERVE_MAX_ITEMS and the rest)",
           422: "missing, unknown or invalid fields", 503: "models loading, or the model's memory unreadable"}


def _responses(*codes: int) -> dict:
    """The 4xx/5xx answers of a route for the OpenAPI: each is one `{"error": ...}` object."""
    return {c: {"model": ErrorBody, "description": _ERRORS[c]} for c in codes}


def _openapi(schema: type[BaseModel], settings: ServeSettings) -> dict:
    """The request body as the service checks it: the model's schema plus this server's limits (app/serve/settings.py) and
    the rules the routes check themselves (their errors say more than a schema's would), so a body the schema
    accepts is one the service does not refuse for its shape."""
    body = schema.model_json_schema()
    props = body["properties"]
    b64_chars = 4 * -(-settings.max_image_bytes // 3)
    items = {"images": (1 if schema is SearchRequest else settings.max_items, 1, b64_chars),
             "texts": (settings.max_items, 0, settings.max_text_chars),
             "classes": (settings.max_classes, 1, settings.max_text_chars),
             "templates": (settings.max_templates, 1, settings.max_text_chars)}
    for name, (most, least, chars) in items.items():
        if name not in props:
            continue
        for option in props[name].get("anyOf", [props[name]]):
            if option.get("type") == "array":
                option["maxItems"] = most
                option["items"].update(minLength=least, maxLength=chars)
    if schema is ClassifyRequest:
        props["images"]["minItems"] = props["classes"]["minItems"] = 1
        props["classes"]["items"]["pattern"] = r"\S"  # not only blanks
        props["templates"]["anyOf"][0].update(minItems=1)
        props["templates"]["anyOf"][0]["items"]["pattern"] = r"\{c\}"
    elif schema is EmbedRequest:  # at least one image or text
        body["anyOf"] = [{"required": [side], "properties": {side: {"minItems": 1}}} for side in ("images", "texts")]
    else:  # one query: a text or one image
        props["text"]["anyOf"][0]["maxLength"] = settings.max_text_chars
        props["memory"]["anyOf"][0]["pattern"] = MEMORY_PATTERN
        props["k"]["maximum"] = settings.max_k
        body["oneOf"] = [
            {"required": ["text"], "properties": {"text": {"type": "string"}, "images": {"maxItems": 0}}},
            {"required": ["images"], "properties": {"images": {"minItems": 1}, "text": {"type": "null"}}}]
    form = json.loads(json.dumps(body))
    form.pop("anyOf", None), form.pop("oneOf", None)  # a form sends files for images: the JSON rules differ
    form["properties"]["images"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                                    "maxItems": items["images"][0]}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body},
                                                           "multipart/form-data": {"schema": form}}}}


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
    app.add_middleware(_BodyGuard, limit=settings.body_limit, timeout=settings.body_timeout_s)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except ClientDisconnect:  # the client went away: nobody to answer, nothing wrong here
            log.info("client disconnected during %s %s", request.method, request.url.path)
            response = Response(status_code=CLIENT_GONE)
        except Exception as exc:  # nothing else caught it: a 500 without a traceback
            log.exception("unexpected error on %s", request.url.path)
            response = _error(500, f"internal error ({type(exc).__name__}); the server log has the details")
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, str(response.status_code)).inc()
        if response.status_code == CLIENT_GONE:
            metrics.disconnects.labels(path).inc()
        elif response.status_code >= 400:
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
        return _error(exc.status_code, msg, exc.headers)  # a 405 keeps its Allow header

    @app.exception_handler(RecoError)
    async def _reco_error(request, exc: RecoError):
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, BackboneMismatch) else 503
        status = exc.status if isinstance(exc, Refused) else status
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

    # strings a valid body can hold: every list at its limit, plus the keys and single fields
    max_strings = 2 * settings.max_items + settings.max_classes + settings.max_templates + 32

    async def _parse(request: Request, schema: type[_Body]) -> tuple[_Body, list[bytes]]:
        """Refuse what is over a limit before paying for it: the declared length before reading, the number of
        strings before parsing, counts and lengths before validating and decoding; big bodies are parsed and
        decoded on worker threads, so the event loop (and /healthz) keeps answering."""
        _authorize(request)
        length = request.headers.get("content-length")
        limit = settings.body_limit
        if length and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {int(length)} bytes is over the {limit}-byte limit "
                                "(RECO_SERVE_MAX_BODY_BYTES)")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            data, raw = await _read_form(request, schema)
        else:
            body = await request.body()
            # every string has two quotes that are not escaped: a cheap bound on the parse's work
            if body.count(b'"') - body.count(b'\\"') > 2 * max_strings:
                raise ApiError(413, f"the JSON body holds more than {max_strings} strings; no request needs that "
                                    "many (RECO_SERVE_MAX_ITEMS, _CLASSES, _TEMPLATES)")
            try:
                data = (json.loads(body or b"{}") if len(body) <= INLINE_JSON_BYTES
                        else await run_in_threadpool(json.loads, body))
            except ValueError as exc:
                raise ApiError(400, f"the body is not valid JSON ({exc}); send a JSON object or a multipart "
                                    "form") from exc
            if not isinstance(data, dict):
                raise ApiError(400, "the JSON body must be an object, e.g. {\"texts\": [\"a red circle\"]}")
            raw = None
        _check_sizes(data, raw)
        try:
            req = schema.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, _validation_message(exc)) from exc
        if raw is None:
            raw = await run_in_threadpool(lambda: [_b64(s, i) for i, s in enumerate(req.images)])
        if len(raw) > settings.max_items:
            raise ApiError(413, f"{len(raw)} images in one request; at most {settings.max_items} "
                                "(RECO_SERVE_MAX_ITEMS): split the request")
        for i, blob in enumerate(raw):
            if len(blob) > settings.max_image_bytes:
                raise ApiError(413, f"image {i} is {len(blob)} bytes, over the {settings.max_image_bytes}-byte "
                                    "limit (RECO_SERVE_MAX_IMAGE_BYTES): send it smaller")
        return req, raw

    def _check_sizes(data: dict, raw: list[bytes] | None) -> None:
        """Counts and lengths against the service's limits, on the parsed body before validation (413)."""
        limits = {"images": (settings.max_items, "RECO_SERVE_MAX_ITEMS"),
                  "texts": (settings.max_items, "RECO_SERVE_MAX_ITEMS"),
                  "classes": (settings.max_classes, "RECO_SERVE_MAX_CLASSES"),
                  "templates": (settings.max_templates, "RECO_SERVE_MAX_TEMPLATES")}
        counts = {k: len(v) for k, v in data.items() if k in limits and isinstance(v, list)}
        if raw is not None:
            counts["images"] = len(raw)
        for key, n in counts.items():
            most, var = limits[key]
            if n > most:
                raise ApiError(413, f"{n} {key} in one request; at most {most} ({var}): split the request")
        chars = settings.max_text_chars
        for key in ("texts", "classes", "templates", "text"):
            values = data.get(key)
            for i, v in enumerate(values if isinstance(values, list) else [values]):
                if isinstance(v, str) and len(v) > chars:
                    where = key if key == "text" else f"{key}.{i}"
                    raise ApiError(413, f"{where} is {len(v)} characters, over the limit of {chars} "
                                        "(RECO_SERVE_MAX_TEXT_CHARS): the model reads only its first ~77 tokens")

    async def _read_form(request: Request, schema: type[_Body]) -> tuple[dict, list[bytes]]:
        from starlette.datastructures import UploadFile

        try:
            form = await request.form(max_files=settings.max_items + 1, max_fields=max_strings)
        except (ApiError, ClientDisconnect):
            raise
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
        """Decoded (under the pixel limit) and preprocessed on a worker thread, one image at a time."""
        return await run_in_threadpool(model.decode_and_preprocess, raw,
                                       lambda blob, i: _decode(blob, i, settings.max_image_pixels))

    def _answer(body: dict, memory: tuple[str, int]) -> JSONResponse:
        body = {"memory": {"name": memory[0], "version": memory[1]}, **body}
        return JSONResponse(body, headers={MEMORY_HEADER: f"{memory[0]}@{memory[1]}"})

    # -- routes -----------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz():
        """Alive: answered on the event loop, never waits for a model thread."""
        return {"status": "ok"}

    @app.get("/readyz", responses=_responses(503))
    async def readyz():
        if not state["ready"]:
            return _error(503, state["error"] or "loading models")
        try:
            await asyncio.wait_for(asyncio.gather(*(m.check() for m in state["models"].values())), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            return _error(503, f"not ready: a model thread has been busy for over {READY_TIMEOUT_S:.0f} s")
        except Exception as exc:
            return _error(503, f"not ready: {exc}")
        return {"status": "ready", "models": list(state["models"])}

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
        **_responses(401)})
    async def metrics_route(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        _authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=_responses(401))
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

    @app.get("/v1/memories", responses=_responses(401))
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

    posted = _responses(400, 401, 404, 408, 413, 422, 503)

    @app.post("/v1/embed", openapi_extra=_openapi(EmbedRequest, settings), responses=posted)
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

    @app.post("/v1/classify", openapi_extra=_openapi(ClassifyRequest, settings), responses=posted)
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
        if len(req.classes) * len(templates) > settings.max_prompts:
            raise ApiError(413, f"{len(req.classes)} classes x {len(templates)} templates = "
                                f"{len(req.classes) * len(templates)} prompts to encode; at most "
                                f"{settings.max_prompts} (RECO_SERVE_MAX_PROMPTS): send fewer classes or templates")
        top_k = min(req.top_k, len(req.classes))  # "the top 5" of two classes is both of them
        model = _model(req.model)
        img = await model.embed("image", await _images(model, raw), len(raw), True)
        w_frozen, w_reco = await model.class_weights(req.classes, templates, img.collection)
        scale = model.logit_scale
        results = []
        for i in range(len(raw)):
            row = {"reco": _top(img.refined[i] @ w_reco.T, req.classes, top_k, scale)}
            if req.compare:
                row["baseline"] = _top(img.frozen[i] @ w_frozen.T, req.classes, top_k, scale)
            results.append(row)
        return _answer({"model": model.name, "results": results}, (img.memory, img.version))

    @app.post("/v1/search", openapi_extra=_openapi(SearchRequest, settings),
              responses={**posted, **_responses(409)})
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
                version = parse_memory_ref(req.memory)[1]
            except RecoError as exc:
                raise ApiError(422, f"memory: {exc}") from exc
            if version is not None and not 1 <= version <= MAX_VERSION:
                raise ApiError(422, f"memory: version {version} is out of range: versions run from 1 to "
                                    f"{MAX_VERSION} (GET /v1/memories lists them)")
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


def _decode(blob: bytes, i: int, max_pixels: int):
    """Bytes -> an RGB image; the size is read from the header and checked before any pixel is decoded (a small
    PNG can declare 12000 x 12000 pixels: 690 MB once decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ApiError(413, f"image {i} is {w} x {h} = {w * h} pixels, over the limit of {max_pixels} "
                                    "(RECO_SERVE_MAX_IMAGE_PIXELS): send it scaled down")
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"image {i} has too many pixels to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ApiError(400, f"image {i} is not an image: send JPEG, PNG, WebP, GIF or BMP bytes") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, f"image {i} cannot be decoded ({exc}): is the file complete?") from exc


CLIENT_GONE = 499  # nginx's "client closed request": counted apart from errors, logged at INFO


class _BodyGuard:
    """ASGI middleware: a request body must arrive within `timeout` seconds of the request and hold at most
    `limit` bytes (chunked bodies too, which declare no length), so slow or endless senders cannot hold a
    connection and its memory for ever. Raised inside the route's read, the 408/413 is an ordinary `{"error"}`."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received, complete = 0, False

        async def guarded_receive():
            nonlocal received, complete
            if complete:  # later reads only wait for a disconnect: no deadline
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.timeout:g} s "
                                    "(RECO_SERVE_BODY_TIMEOUT_S)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ApiError(413, f"request body over the {self.limit}-byte limit (RECO_SERVE_MAX_BODY_BYTES)")
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, guarded_receive, send)


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
