"""HTTP routes of `dream-fast serve` (FastAPI): OpenAI-compatible images and embeddings, the native
/v1/generate, /healthz and /metrics. Every bad input is a 4xx JSON error naming the field.

Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from dream_fast.serve.engine import Engine, GenSettings, Job, NotAccepting, QueueFull

log = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUTES = ("/healthz", "/metrics", "/v1/generate", "/v1/images/generations", "/v1/embeddings", "/v1/models")
OPEN_ROUTES = ("/healthz",)  # no api key needed (load balancers probe it)
MAX_SEED = 2**63 - 1


@dataclass
class ServeConfig:
    """Limits and identity of one server (the CLI fills it from its flags)."""

    model_name: str = "dream"
    api_key: str | None = None
    timeout_s: float = 60.0
    max_prompts: int = 16  # prompts per /v1/generate request (OpenAI n is at most 10 as well)
    max_candidates: int = 8
    max_steps: int = 256
    max_cfg: float = 50.0
    max_prompt_chars: int = 1000
    max_embed_items: int = 64
    max_body_bytes: int = 16 * 2**20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type_, headers


def error_response(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # strict: "2" is not an int and 1 is not a bool; unknown fields are errors, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class DreamSettings(_Body):
    """DREAM's own settings, optional on every generation route (defaults: the bundle's config)."""

    seed: int | None = None
    num_candidates: int | None = None
    threshold: int | None = None
    steps: int | None = None
    cfg: float | None = None
    cfg_schedule: Literal["linear", "constant"] | None = None
    temperature: float | None = None
    greedy: bool | None = None
    timeout_s: float | None = None


class GenerateBody(DreamSettings):
    prompts: list[str]


class ImagesBody(DreamSettings):
    """OpenAI POST /v1/images/generations as clients send it."""

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    output_format: str | None = None


class EmbeddingsBody(_Body):
    """OpenAI POST /v1/embeddings (`input`: texts) plus `images` (base64 PNGs) and zero-shot `labels`."""

    input: Any = None
    images: list[str] | None = None
    labels: list[str] | None = None
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


def _validation_error(e: ValidationError, model: type[BaseModel]) -> ApiError:
    errs = e.errors(include_url=False)
    # an unknown field first: {"prompt": ...} on /v1/generate is a misspelt name, not a missing one
    err = next((x for x in errs if x.get("type") == "extra_forbidden"), errs[0])
    loc = [str(p) for p in err.get("loc", ())]
    param = ".".join(loc) if loc else None
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return ApiError(400, f"unknown field {param!r}; allowed fields: {allowed}", param)
    if kind == "missing":
        return ApiError(400, f"field {param!r} is required", param)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return ApiError(400, "the request body must be a JSON object", None)
    got = err.get("input")
    got_s = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None), list, dict)) else repr(got)
    return ApiError(400, f"{param}: {err.get('msg', 'invalid value')} (got {got_s})", param)


async def read_body(request: Request, model: type[BaseModel], limit: int) -> Any:
    """Parse and validate a JSON body (413 past `limit` bytes, 400 for malformed JSON or bad fields)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", None)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", None)
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None) from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}", None)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e, model) from None


# ----------------------------------------------------------------------------- checks


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ApiError(400, message, param)


class Validator:
    """Checks that need the model: settings ranges, prompt length in tokens, image size."""

    def __init__(self, pipe, cfg: ServeConfig):
        self.pipe, self.cfg = pipe, cfg
        m = pipe.cfg.model
        self.img_size, self.text_context = m.img_size, m.text_context
        self.size_str = f"{m.img_size}x{m.img_size}"

    def settings(self, b: DreamSettings) -> GenSettings:
        c, s = self.cfg, self.pipe.cfg.sample
        if b.num_candidates is not None:
            _check(1 <= b.num_candidates <= c.max_candidates, "num_candidates",
                   f"num_candidates must be in [1, {c.max_candidates}], got {b.num_candidates}")
        if b.steps is not None:
            _check(1 <= b.steps <= c.max_steps, "steps", f"steps must be in [1, {c.max_steps}], got {b.steps}")
        K = s.num_candidates if b.num_candidates is None else b.num_candidates
        N = s.num_iter if b.steps is None else b.steps
        if K > 1:
            _check(N >= 2, "steps", f"SAD with num_candidates={K} needs steps >= 2, got {N}")
        if b.threshold is not None:
            _check(K > 1, "threshold", "threshold is SAD's scoring step; it needs num_candidates > 1")
            _check(1 <= b.threshold < N, "threshold",
                   f"threshold must be in [1, steps-1={N - 1}] (steps={N}), got {b.threshold}")
        if b.cfg is not None:
            _check(1.0 <= b.cfg <= c.max_cfg, "cfg", f"cfg must be in [1.0, {c.max_cfg}], got {b.cfg}")
        if b.temperature is not None:
            _check(0.0 < b.temperature <= 10.0, "temperature", f"temperature must be in (0, 10], got {b.temperature}")
        if b.seed is not None:
            _check(0 <= b.seed <= MAX_SEED, "seed", f"seed must be in [0, 2**63-1], got {b.seed}")
        if b.timeout_s is not None:
            _check(0.0 < b.timeout_s <= c.timeout_s, "timeout_s",
                   f"timeout_s must be in (0, {c.timeout_s}] (the server's --timeout-s), got {b.timeout_s}")
        try:
            r = self.pipe.resolve(K, b.threshold, N, b.cfg, b.cfg_schedule, b.temperature, b.greedy)
        except ValueError as e:  # every case is checked above; this keeps any other a 400
            raise ApiError(400, str(e), None) from None
        return GenSettings(**r)

    def prompts(self, prompts: list[str], param: str) -> list[str]:
        c = self.cfg
        _check(1 <= len(prompts) <= c.max_prompts, param,
               f"{param} must hold 1 to {c.max_prompts} prompts, got {len(prompts)}")
        for i, p in enumerate(prompts):
            name = f"{param}[{i}]" if param == "prompts" else param
            _check(bool(p.strip()), name, f"{name} is empty; give a non-empty text prompt")
            _check(len(p) <= c.max_prompt_chars, name,
                   f"{name} is {len(p)} characters; at most {c.max_prompt_chars} allowed")
        tok = self.pipe.tokenizer
        if tok is not None:
            ids, cut = tok.encode(prompts, self.text_context, return_truncated=True)
            for i in cut.nonzero().reshape(-1).tolist():
                name = f"{param}[{i}]" if param == "prompts" else param
                raise ApiError(400, f"{name} is longer than the model's text context of {self.text_context} "
                               "tokens (start and end included); shorten it", name)
        return prompts

    def texts(self, texts: list[str], param: str) -> list[str]:
        for i, t in enumerate(texts):
            name = f"{param}[{i}]"
            _check(bool(t.strip()), name, f"{name} is empty; give a non-empty text")
            _check(len(t) <= self.cfg.max_prompt_chars, name,
                   f"{name} is {len(t)} characters; at most {self.cfg.max_prompt_chars} allowed")
        return texts

    def image(self, data: str, name: str) -> Image.Image:
        """A base64 PNG (optionally a data: URL) of exactly the model's size -> RGB PIL image."""
        if data.startswith("data:"):
            head, _, data = data.partition(",")
            _check(head.startswith("data:image/png"), name, f"{name} is a {head!r} data URL; give a PNG")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{name} is not valid base64; give a base64-encoded PNG", name) from None
        _check(raw.startswith(PNG_MAGIC), name,
               f"{name} is not a PNG (wrong signature); give a {self.size_str} PNG")
        try:
            img = Image.open(io.BytesIO(raw), formats=["PNG"])
            size = img.size
            _check(size == (self.img_size, self.img_size), name,
                   f"{name} is {size[0]}x{size[1]} pixels; this model takes {self.size_str} PNGs")
            img.load()
        except ApiError:
            raise
        except Exception as e:  # truncated or corrupt data after a valid signature
            raise ApiError(400, f"{name} is not a readable PNG ({type(e).__name__}: {e})", name) from None
        return img.convert("RGB")


# ----------------------------------------------------------------------------- middleware


class AuthAndMetrics:
    """Pure ASGI middleware: bearer-key check (every route but /healthz) and per-route counts and
    latency. Pure ASGI keeps `receive` untouched, so a handler can watch for the client leaving."""

    def __init__(self, app, metrics, api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    def _authorised(self, scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = {"code": 499}  # stays 499 (client closed the request) when no response was sent
        t0 = time.perf_counter()

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            if self.api_key and path not in OPEN_ROUTES and not self._authorised(scope):
                resp = error_response(401, "missing or wrong api key; send 'Authorization: Bearer KEY'",
                                      None, "authentication_error", {"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.inc(route=route, status=str(status["code"]))
            self.metrics.latency.observe(time.perf_counter() - t0, route=route)


# ----------------------------------------------------------------------------- app


class _ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read already, so the next ASGI
    message is http.disconnect)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def create_app(engine: Engine, pipe, cfg: ServeConfig) -> FastAPI:
    """The ASGI app around a started-or-not Engine (started at lifespan start, drained at its end)."""
    check = Validator(pipe, cfg)
    metrics = engine.metrics
    state = {"in_flight": 0}  # jobs submitted and not yet answered (event loop only)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # uvicorn has finished every in-flight request by now (SIGTERM: stop accepting, drain)
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="dream-fast serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.type, e.headers)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, e: _ClientGone):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}", None, "server_error")

    async def run_job(request: Request, kind: str, key, payload, size: int, timeout_s: float | None):
        loop = asyncio.get_running_loop()
        job = Job(kind, key, payload, size, loop, loop.create_future())
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), None, "server_overloaded", {"Retry-After": str(e.retry_after_s)}) from None
        except NotAccepting as e:
            raise ApiError(503, str(e), None, "server_unavailable", {"Retry-After": "1"}) from None
        timeout = cfg.timeout_s if timeout_s is None else timeout_s
        watcher = asyncio.ensure_future(_disconnected(request))
        state["in_flight"] += 1
        metrics.in_flight.set(state["in_flight"])
        try:
            done, _ = await asyncio.wait({job.future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            state["in_flight"] -= 1
            metrics.in_flight.set(state["in_flight"])
        if job.future in done:
            return job.future.result()
        reason = "disconnect" if watcher in done else "timeout"
        started = not engine.cancel(job, reason)
        if reason == "disconnect":
            raise _ClientGone()
        where = "its batch was still running" if started else "it was still queued"
        raise ApiError(504, f"the request did not finish within timeout_s={timeout:g} s ({where}); "
                       "retry later or allow a longer timeout_s", None, "timeout")

    def _b64(png: bytes) -> str:
        return base64.b64encode(png).decode("ascii")

    @app.get("/healthz")
    async def healthz():
        if engine.ready.is_set():
            m = pipe.cfg.model
            return {"status": "ok", "model": cfg.model_name, "size": check.size_str, "device": str(pipe.device),
                    "queue_depth": engine.depth(), "in_flight": state["in_flight"], "max_batch": engine.max_batch,
                    "fixed_batch": engine.runner.fixed_batch is not None, "text_context": m.text_context}
        status = "error" if engine.error else "warming"
        return JSONResponse({"status": status, "detail": engine.error}, status_code=503)

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "dream-fast"}]}

    @app.post("/v1/generate")
    async def generate(request: Request):
        body = await read_body(request, GenerateBody, cfg.max_body_bytes)
        st = check.settings(body)
        prompts = check.prompts(body.prompts, "prompts")
        seed = 0 if body.seed is None else body.seed
        seeds = [(seed + i) & MAX_SEED for i in range(len(prompts))]
        r = await run_job(request, "generate", st, (prompts, seeds), len(prompts), body.timeout_s)
        images = [
            {"prompt": p, "seed": s, "b64_png": _b64(png),
             "scores": None if r["scores"] is None else r["scores"][i],
             "chosen": None if r["chosen"] is None else r["chosen"][i]}
            for i, (p, s, png) in enumerate(zip(prompts, seeds, r["pngs"]))
        ]
        settings = {k: getattr(st, k) for k in GenSettings.__dataclass_fields__}
        return {"model": cfg.model_name, "images": images, "settings": settings, "timings": r["timings"]}

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body = await read_body(request, ImagesBody, cfg.max_body_bytes)
        n_max = min(10, cfg.max_prompts)
        _check(1 <= body.n <= n_max, "n", f"n must be in [1, {n_max}], got {body.n}")
        _check(body.size in (None, "auto", check.size_str), "size",
               f"size must be {check.size_str!r} (this model's own size), got {body.size!r}")
        _check(body.response_format in (None, "b64_json"), "response_format",
               f"response_format must be 'b64_json' (this server returns no URLs), got {body.response_format!r}")
        _check(body.output_format in (None, "png"), "output_format",
               f"output_format must be 'png', got {body.output_format!r}")
        st = check.settings(body)
        check.prompts([body.prompt], "prompt")
        seed = secrets.randbits(62) if body.seed is None else body.seed  # OpenAI clients expect variety
        seeds = [(seed + i) & MAX_SEED for i in range(body.n)]
        r = await run_job(request, "generate", st, ([body.prompt] * body.n, seeds), body.n, body.timeout_s)
        return {
            "created": int(time.time()),
            "model": body.model or cfg.model_name,
            "data": [{"b64_json": _b64(png)} for png in r["pngs"]],
            "size": check.size_str,
            "output_format": "png",
            "seeds": seeds,
            "scores": r["scores"],
            "chosen": r["chosen"],
            "timings": r["timings"],
        }

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_body(request, EmbeddingsBody, cfg.max_body_bytes)
        inp = body.input
        if isinstance(inp, str):
            texts = [inp]
        elif inp is None:
            texts = []
        elif isinstance(inp, list) and all(isinstance(t, str) for t in inp):
            texts = list(inp)
        else:
            raise ApiError(400, "input must be a string or a list of strings (token arrays are not accepted)",
                           "input")
        images_b64 = body.images or []
        n = len(texts) + len(images_b64)
        _check(n >= 1, "input", "give at least one text in 'input' or one base64 PNG in 'images'")
        _check(n <= cfg.max_embed_items, "input",
               f"at most {cfg.max_embed_items} texts and images together, got {n}")
        check.texts(texts, "input")
        labels = body.labels
        if labels is not None:
            _check(1 <= len(labels) <= cfg.max_embed_items, "labels",
                   f"labels must hold 1 to {cfg.max_embed_items} strings, got {len(labels)}")
            check.texts(labels, "labels")
            _check(len(set(labels)) == len(labels), "labels", "labels must be distinct")
        dim = pipe.cfg.model.proj_dim
        if body.dimensions is not None:
            _check(body.dimensions == dim, "dimensions",
                   f"dimensions must be {dim} (this model's embedding size), got {body.dimensions}")
        imgs = [check.image(b, f"images[{i}]") for i, b in enumerate(images_b64)]
        key = ("embed", tuple(labels) if labels else None)
        payload = {"texts": texts, "images": imgs, "labels": labels}
        r = await run_job(request, "embed", key, payload, n, None)
        b64 = body.encoding_format == "base64"

        def enc(v: list[float]):
            if not b64:
                return v
            import numpy as np

            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")

        data = []
        for kind, vecs, probs in (("text", r["text"], r["text_label_probs"]),
                                  ("image", r["image"], r["image_label_probs"])):
            for j, v in enumerate(vecs or []):
                item = {"object": "embedding", "index": len(data), "kind": kind, "embedding": enc(v)}
                if probs is not None:
                    item["label_probs"] = dict(zip(labels, probs[j]))
                data.append(item)
        tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "model": body.model or cfg.model_name, "data": data, "labels": labels,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "timings": r["timings"]}

    return AuthAndMetrics(app, metrics, cfg.api_key)
