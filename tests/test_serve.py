"""`dream-fast serve` as users meet it: real uvicorn server processes on loopback, a real HTTP client
(httpx, and the OpenAI client): every route, batched = alone bit for bit, 100 mixed requests from 16
clients, 503 past the queue, clients that leave, timeouts, the api key and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="`dream-fast serve` needs the serve extra (pip install -e '.[dev]')")
pytest.importorskip("uvicorn", reason="`dream-fast serve` needs the serve extra (pip install -e '.[dev]')")

from PIL import Image  # noqa: E402
from sampling_helpers import tiny_model  # noqa: E402

from dream_fast.data import BPETokenizer, make_sample  # noqa: E402
from dream_fast.pretrained import save_pretrained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [
    "a large green triangle in the bottom right on a navy background",
    "a small purple triangle in the bottom right on a white background",
    "a large orange circle in the center on a white background",
    "a large cyan circle at the top on a navy background",
]
SLOW = {"steps": 64, "num_candidates": 8}  # ~1-2 s per prompt: keeps the worker busy past a 0.3 s client timeout


# ----------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The tiny preset at depth 1 (random weights, a head that depends on the prompt) with a BPE
    trained on shapes captions at the preset's vocabulary, sampling 4 steps with SAD K = 2."""
    cfg, model = tiny_model()
    tok = BPETokenizer.train([make_sample(0, "train", i)[1] for i in range(400)], cfg.model.vocab_size)
    model.set_text_specials(tok.eot_id, tok.encode([""], cfg.model.text_context)[0])
    cfg.sample.num_iter, cfg.sample.sad_threshold, cfg.sample.num_candidates = 4, 2, 2
    return save_pretrained(model.state_dict(), cfg, tok, tmp_path_factory.mktemp("serve") / "tiny-dream")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m dream_fast.cli serve ...` in its own process, on a free loopback port."""

    def __init__(self, bundle: Path, log: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("DREAM_API_KEY", None)
        cmd = [sys.executable, "-m", "dream_fast.cli", "serve", "--checkpoint", str(bundle), "--port", str(self.port),
               "--log-level", "warning", *args]
        self._log_f = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log_f, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> Server:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=2)
            except httpx.TransportError:
                r = None  # not listening yet
            if r is not None:
                if r.status_code == 200:
                    return self
                # listening but not warmed up: not ready, and says so
                assert r.status_code == 503 and r.json()["status"] == "warming", r.text
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_f.close()


@pytest.fixture(scope="module")
def servers(bundle, tmp_path_factory):
    """Started together (their start-ups overlap): main (batches of 4 padded to 4, 100 ms wait),
    tight (one prompt per batch, queue of 2, api key), drain (batches of 2, for SIGTERM)."""
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "main": Server(bundle, logs / "main.log", "--max-batch", "4", "--max-wait-ms", "100", "--fixed-batch", "on"),
        "tight": Server(bundle, logs / "tight.log", "--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "2",
                        "--api-key", KEY, "--warmup-batches", "1"),
        "drain": Server(bundle, logs / "drain.log", "--max-batch", "2", "--warmup-batches", "1"),
    }
    yield started
    for s in started.values():
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def main(servers) -> Server:
    return servers["main"].wait_ready()


@pytest.fixture(scope="module")
def tight(servers) -> Server:
    return servers["tight"].wait_ready()


def png(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(raw))
    assert img.format == "PNG" and img.size == (32, 32)
    return np.asarray(img.convert("RGB"))


def b64_png(size=(32, 32), seed=0) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample line of Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


def wait_for(url: str, pred, headers=None, timeout: float = 20.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = httpx.get(f"{url}/healthz", headers=headers, timeout=5).json()
        if pred(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s; last /healthz: {h}")


# ----------------------------------------------------------------------------- routes


def test_healthz_models_and_generate(main):
    h = httpx.get(f"{main.url}/healthz").json()
    assert h["status"] == "ok" and h["size"] == "32x32" and h["model"] == "tiny-dream" and h["fixed_batch"]
    assert httpx.get(f"{main.url}/v1/models").json()["data"][0]["id"] == "tiny-dream"
    r = httpx.post(f"{main.url}/v1/generate", json={"prompts": PROMPTS[:2], "seed": 3, "num_candidates": 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    d = r.json()
    assert [im["seed"] for im in d["images"]] == [3, 4] and [im["prompt"] for im in d["images"]] == PROMPTS[:2]
    for im in d["images"]:
        png(im["b64_png"])
        assert len(im["scores"]) == 3 and im["chosen"] == int(np.argmax(im["scores"]))
    assert d["settings"]["num_candidates"] == 3 and d["settings"]["threshold"] == 2 and d["settings"]["steps"] == 4
    assert {"queue_s", "text_s", "sample_s", "decode_s", "batch_prompts"} <= set(d["timings"])
    plain = httpx.post(f"{main.url}/v1/generate", json={"prompts": PROMPTS[:1], "num_candidates": 1},
                       timeout=60).json()
    assert plain["images"][0]["scores"] is None and plain["settings"]["threshold"] is None


def test_openai_client_images_and_embeddings(main):
    openai = pytest.importorskip("openai", reason="the OpenAI client is an optional dev dependency")
    client = openai.OpenAI(base_url=f"{main.url}/v1", api_key="unused-on-loopback", max_retries=0)
    r = client.images.generate(model="dall-e-2", prompt=PROMPTS[0], n=2, size="32x32", response_format="b64_json")
    assert len(r.data) == 2 and all(png(im.b64_json).shape == (32, 32, 3) for im in r.data)
    raw = httpx.post(f"{main.url}/v1/images/generations", json={"model": "dall-e-2", "prompt": PROMPTS[0]},
                     timeout=60).json()
    assert raw["model"] == "dall-e-2" and isinstance(raw["created"], int) and len(raw["data"]) == 1
    # DREAM settings ride along as extra fields; the same seed gives the same image on both routes
    seeded = client.images.generate(model="x", prompt=PROMPTS[1], extra_body={"seed": 7, "num_candidates": 2})
    native = httpx.post(f"{main.url}/v1/generate", json={"prompts": [PROMPTS[1]], "seed": 7, "num_candidates": 2},
                        timeout=60).json()
    assert seeded.data[0].b64_json == native["images"][0]["b64_png"]
    with pytest.raises(openai.BadRequestError, match="size must be '32x32'"):
        client.images.generate(prompt=PROMPTS[0], size="1024x1024")
    # the client asks for base64 floats by default; they must equal the float form
    e = client.embeddings.create(model="x", input=PROMPTS[:2])
    plain = httpx.post(f"{main.url}/v1/embeddings", json={"input": PROMPTS[:2]}, timeout=60).json()
    assert len(e.data) == 2
    np.testing.assert_allclose(e.data[1].embedding, plain["data"][1]["embedding"], rtol=1e-6)


def test_embeddings_and_zero_shot_labels(main):
    labels = ["a circle", "a triangle", "a square"]
    img = httpx.post(f"{main.url}/v1/generate", json={"prompts": [PROMPTS[2]], "seed": 1}, timeout=60).json()
    images = [img["images"][0]["b64_png"], b64_png(seed=1)]
    r = httpx.post(f"{main.url}/v1/embeddings", json={"input": PROMPTS[0], "images": images, "labels": labels},
                   timeout=60)
    assert r.status_code == 200, r.text
    d = r.json()
    assert [it["kind"] for it in d["data"]] == ["text", "image", "image"] and d["labels"] == labels
    emb = np.array([it["embedding"] for it in d["data"]])
    assert emb.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    lab = np.array([it["embedding"] for it in httpx.post(f"{main.url}/v1/embeddings", json={"input": labels},
                                                         timeout=60).json()["data"]])
    for it, e in zip(d["data"], emb):
        p = np.array([it["label_probs"][k] for k in labels])
        assert abs(p.sum() - 1) < 1e-5
        # a softmax over the cosines with the labels' own embeddings (one positive scale)
        assert list(np.argsort(p)) == list(np.argsort(lab @ e))
    # the same text alone and among others embeds the same
    alone = httpx.post(f"{main.url}/v1/embeddings", json={"input": [PROMPTS[0]]}, timeout=60).json()
    assert alone["data"][0]["embedding"] == d["data"][0]["embedding"]  # --fixed-batch: one shape


BAD = [
    # (route, body (dict, or raw bytes), status, param, words in the message)
    ("/v1/generate", {"prompts": [""]}, 400, "prompts[0]", "empty"),
    ("/v1/generate", {"prompts": ["   "]}, 400, "prompts[0]", "empty"),
    ("/v1/generate", {"prompts": []}, 400, "prompts", "1 to 16"),
    ("/v1/generate", {"prompts": ["a"] * 17}, 400, "prompts", "1 to 16"),
    ("/v1/generate", {"prompts": ["x" * 1001]}, 400, "prompts[0]", "at most 1000"),
    ("/v1/generate", {"prompts": [" ".join(PROMPTS)]}, 400, "prompts[0]", "text context of 16 tokens"),
    ("/v1/generate", {"prompts": ["a"], "num_candidates": 0}, 400, "num_candidates", "[1, 8]"),
    ("/v1/generate", {"prompts": ["a"], "num_candidates": 9}, 400, "num_candidates", "[1, 8]"),
    ("/v1/generate", {"prompts": ["a"], "threshold": 4, "steps": 4}, 400, "threshold", "[1, steps-1=3]"),
    ("/v1/generate", {"prompts": ["a"], "threshold": 1, "num_candidates": 1}, 400, "threshold", "num_candidates > 1"),
    ("/v1/generate", {"prompts": ["a"], "steps": 0}, 400, "steps", "[1, 256]"),
    ("/v1/generate", {"prompts": ["a"], "steps": 1}, 400, "steps", "steps >= 2"),
    ("/v1/generate", {"prompts": ["a"], "cfg": 0.5}, 400, "cfg", "[1.0, 50.0]"),
    ("/v1/generate", {"prompts": ["a"], "temperature": 0}, 400, "temperature", "(0, 10]"),
    ("/v1/generate", {"prompts": ["a"], "seed": -1}, 400, "seed", "2**63-1"),
    ("/v1/generate", {"prompts": ["a"], "cfg_schedule": "cosine"}, 400, "cfg_schedule", "'linear' or 'constant'"),
    ("/v1/generate", {"prompts": ["a"], "steps": "4"}, 400, "steps", "valid integer"),
    ("/v1/generate", {"prompts": ["a"], "greedy": 1}, 400, "greedy", "valid boolean"),
    ("/v1/generate", {"prompts": "a"}, 400, "prompts", "valid list"),
    ("/v1/generate", {"prompts": [3]}, 400, "prompts.0", "valid string"),
    ("/v1/generate", {"prompt": "a"}, 400, "prompt", "unknown field 'prompt'; allowed fields"),
    ("/v1/generate", {}, 400, "prompts", "required"),
    ("/v1/generate", {"prompts": ["a"], "timeout_s": 1e9}, 400, "timeout_s", "--timeout-s"),
    ("/v1/generate", b'{"prompts": ["a"],', 400, None, "not valid JSON"),
    ("/v1/generate", b"", 400, None, "empty"),
    ("/v1/generate", b'["a"]', 400, None, "JSON object"),
    ("/v1/generate", b"\xff\xfe", 400, None, "not valid JSON"),
    ("/v1/images/generations", {"prompt": "a", "n": 0}, 400, "n", "[1, 10]"),
    ("/v1/images/generations", {"prompt": "a", "n": 11}, 400, "n", "[1, 10]"),
    ("/v1/images/generations", {"prompt": "a", "n": "two"}, 400, "n", "valid integer"),
    ("/v1/images/generations", {"prompt": "a", "size": "1024x1024"}, 400, "size", "'32x32'"),
    ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, 400, "response_format", "'b64_json'"),
    ("/v1/images/generations", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt", "required"),
    ("/v1/images/generations", {"prompt": "a", "cfg": 0.0}, 400, "cfg", "[1.0, 50.0]"),
    ("/v1/embeddings", {"images": [b64_png((64, 48))]}, 400, "images[0]", "64x48 pixels; this model takes 32x32"),
    ("/v1/embeddings", {"images": [base64.b64encode(b"GIF89a....").decode()]}, 400, "images[0]", "not a PNG"),
    ("/v1/embeddings", {"images": ["not base64!"]}, 400, "images[0]", "not valid base64"),
    ("/v1/embeddings", {"images": [base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()]}, 400, "images[0]",
     "not a readable PNG"),
    ("/v1/embeddings", {"images": "abc"}, 400, "images", "valid list"),
    ("/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "input", "list of strings"),
    ("/v1/embeddings", {}, 400, "input", "at least one"),
    ("/v1/embeddings", {"input": "a", "labels": []}, 400, "labels", "1 to 64"),
    ("/v1/embeddings", {"input": "a", "labels": ["x", "x"]}, 400, "labels", "distinct"),
    ("/v1/embeddings", {"input": "a", "dimensions": 8}, 400, "dimensions", "must be 64"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 400, "encoding_format", "'float' or 'base64'"),
    ("/v1/nope", {"prompt": "a"}, 404, None, ""),
]


@pytest.mark.parametrize("route,body,status,param,words", BAD, ids=[f"{b[0]}:{b[3]}:{b[4]}" for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(main, route, body, status, param, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = httpx.post(f"{main.url}{route}", timeout=30, **kw)
    assert r.status_code == status, r.text
    if status == 404:
        return
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error" and err["code"] == status


# ----------------------------------------------------------------------------- batching


def test_batched_image_is_bit_identical_to_alone(main):
    """The same (prompt, seed, settings) gives the same PNG bytes and SAD scores alone and inside a
    batch of others (coalesced from separate concurrent requests with other prompts and seeds)."""
    st = {"num_candidates": 2, "steps": 4}
    alone = httpx.post(f"{main.url}/v1/generate", json={"prompts": [PROMPTS[1]], "seed": 11, **st}, timeout=60)
    assert alone.json()["timings"]["batch_prompts"] == 1

    async def burst():
        async with httpx.AsyncClient(base_url=main.url, timeout=60) as c:
            bodies = [{"prompts": [PROMPTS[i % 4]], "seed": 100 + i, **st} for i in range(5)]
            bodies.insert(3, {"prompts": [PROMPTS[1]], "seed": 11, **st})
            return await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))

    rs = [r.json() for r in asyncio.run(burst())]
    assert all("images" in r for r in rs), rs
    batched = rs[3]
    assert batched["timings"]["batch_prompts"] > 1, "the burst was not coalesced; nothing was tested"
    assert batched["images"][0]["b64_png"] == alone.json()["images"][0]["b64_png"]
    assert batched["images"][0]["scores"] == alone.json()["images"][0]["scores"]
    # other seeds give other images (the comparison above can fail)
    assert rs[0]["images"][0]["b64_png"] != rs[5]["images"][0]["b64_png"]  # same prompt, other seed


def test_100_requests_16_clients_invalid_and_cancelled(main):
    """100 requests from 16 concurrent clients: 60 valid generations (each must equal its alone
    reference bit for bit), 10 embeddings, 20 invalid (each a 4xx), 10 whose client gives up after
    50 ms. No 5xx, the server healthy afterwards, the queue empty and the memory flat over rounds."""
    refs = {}
    for i, p in enumerate(PROMPTS):
        r = httpx.post(f"{main.url}/v1/generate", json={"prompts": [p], "seed": i}, timeout=60).json()
        refs[(p, i)] = r["images"][0]["b64_png"]
    bad = [(route, body) for route, body, *_ in BAD if not isinstance(body, bytes) and route != "/v1/nope"]
    plan = []
    for k in range(100):
        if k % 10 in (1, 4):
            plan.append(("bad", *bad[k % len(bad)]))
        elif k % 10 == 7:
            plan.append(("cancel", "/v1/generate", {"prompts": [PROMPTS[k % 4]], "seed": 50 + k, "steps": 8}))
        elif k % 10 == 9:
            plan.append(("embed", "/v1/embeddings", {"input": PROMPTS[k % 4], "labels": ["circle", "triangle"]}))
        elif k % 2:
            i = k % 4
            plan.append(("openai", "/v1/images/generations", {"prompt": PROMPTS[i], "seed": i, "model": "m"}))
        else:
            i = k % 4
            plan.append(("gen", "/v1/generate", {"prompts": [PROMPTS[i]], "seed": i}))
    counts = {}
    for kind, *_ in plan:
        counts[kind] = counts.get(kind, 0) + 1
    assert counts == {"bad": 20, "cancel": 10, "embed": 10, "openai": 20, "gen": 40}

    async def storm():
        queue = list(enumerate(plan))
        out = {}

        async def client():
            async with httpx.AsyncClient(base_url=main.url, timeout=120) as c:
                while queue:
                    k, (kind, route, body) = queue.pop(0)
                    try:
                        t = 0.05 if kind == "cancel" else 120
                        out[k] = await c.post(route, json=body, timeout=t)
                    except httpx.TimeoutException:
                        out[k] = None

        await asyncio.gather(*(client() for _ in range(16)))
        return out

    rss = []
    for _ in range(2):
        out = asyncio.run(storm())
        for k, (kind, _route, body) in enumerate(plan):
            r = out[k]
            if kind == "cancel":
                assert r is None or r.status_code == 200
                continue
            assert r is not None and r.status_code < 500, (kind, body, r and r.text)
            if kind == "bad":
                assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text
            elif kind == "embed":
                assert r.status_code == 200 and len(r.json()["data"][0]["label_probs"]) == 2
            elif kind == "gen":
                assert r.status_code == 200 and r.json()["images"][0]["b64_png"] == refs[(body["prompts"][0],
                                                                                          body["seed"])]
            else:
                assert r.status_code == 200 and r.json()["data"][0]["b64_json"] == refs[(body["prompt"],
                                                                                         body["seed"])]
        h = wait_for(main.url, lambda h: h["in_flight"] == 0)
        assert h["status"] == "ok" and h["queue_depth"] == 0
        rss.append(main.rss_mb())
    text = httpx.get(f"{main.url}/metrics").text
    assert "dream_requests_total" in text
    # (only /healthz answered 503, while the server was warming up before the tests)
    five = [ln for ln in text.splitlines() if ln.startswith("dream_requests_total") and 'status="5' in ln]
    assert not [ln for ln in five if 'route="/healthz"' not in ln], five
    assert metric(text, "dream_batch_size_count", kind="generate") > 0
    assert rss[1] - rss[0] < 64, f"server memory grew from {rss[0]:.0f} MB to {rss[1]:.0f} MB over a round"


def test_metrics_exposition(main):
    httpx.post(f"{main.url}/v1/generate", json={"prompts": [PROMPTS[0]]}, timeout=60)
    text = httpx.get(f"{main.url}/metrics").text
    for name in ("dream_request_latency_seconds_bucket", "dream_queue_depth", "dream_batch_size_bucket",
                 "dream_images_per_second", "dream_images_generated_total", "dream_jobs_in_flight", "dream_ready"):
        assert name in text, name
    assert metric(text, "dream_requests_total", route="/v1/generate", status="200") >= 1
    assert metric(text, "dream_ready") == 1
    assert metric(text, "dream_images_per_second") > 0


# ----------------------------------------------------------------------------- faults (max-batch 1, queue 2)


async def _with_busy_worker(tight: Server, then):
    """Run then(client, slow_task) while a ~1 s request occupies the tight server's model thread."""
    async with httpx.AsyncClient(base_url=tight.url, timeout=120, headers=AUTH) as c:
        slow = asyncio.ensure_future(c.post("/v1/generate", json={"prompts": [PROMPTS[0]], **SLOW}))
        for _ in range(1000):  # until the slow job runs (in flight, nothing queued)
            h = (await c.get("/healthz")).json()
            if h["in_flight"] == 1 and h["queue_depth"] == 0:
                break
            await asyncio.sleep(0.01)
        result = await then(c, slow)
        assert (await slow).status_code == 200
        return result


def test_api_key_required_when_given(tight):
    assert httpx.get(f"{tight.url}/healthz").status_code == 200  # probes need no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{tight.url}/v1/generate", json={"prompts": ["a"]}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{tight.url}/metrics").status_code == 401
    assert httpx.get(f"{tight.url}/metrics", headers=AUTH).status_code == 200


def test_off_loopback_needs_an_api_key(bundle):
    env = {k: v for k, v in os.environ.items() if k != "DREAM_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "dream_fast.cli", "serve", "--checkpoint", str(bundle), "--host",
                        "0.0.0.0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--api-key" in r.stderr and "not a loopback address" in r.stderr


def test_full_queue_answers_503_with_retry_after(tight):
    async def flood(c, slow):
        return await asyncio.gather(*(c.post("/v1/generate", json={"prompts": [PROMPTS[1]], "seed": i})
                                      for i in range(5)))

    rs = asyncio.run(_with_busy_worker(tight, flood))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 503, 503, 503], [r.text for r in rs]
    for r in rs:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "server_overloaded"
    text = httpx.get(f"{tight.url}/metrics", headers=AUTH).text
    assert metric(text, "dream_rejected_total") >= 3


def test_client_that_leaves_is_dropped_from_its_batch(tight):
    before = httpx.get(f"{tight.url}/metrics", headers=AUTH).text

    async def leave(c, slow):
        with pytest.raises(httpx.TimeoutException):
            await c.post("/v1/generate", json={"prompts": [PROMPTS[2]]}, timeout=0.3)
        assert not slow.done(), "the slow request finished first: the client did not leave a queued job"
        for _ in range(200):  # the server notices the closed connection and drops the job
            if (await c.get("/healthz")).json()["queue_depth"] == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(_with_busy_worker(tight, leave))
    after = httpx.get(f"{tight.url}/metrics", headers=AUTH).text
    dropped = metric(after, "dream_jobs_dropped_total", reason="disconnect") - metric(
        before, "dream_jobs_dropped_total", reason="disconnect")
    made = metric(after, "dream_images_generated_total") - metric(before, "dream_images_generated_total")
    assert dropped == 1 and made == 1  # only the slow request's image was generated


def test_request_timeout_is_a_504(tight):
    async def late(c, slow):
        t0 = time.monotonic()
        r = await c.post("/v1/generate", json={"prompts": [PROMPTS[3]], "timeout_s": 0.3})
        return r, time.monotonic() - t0

    r, dt = asyncio.run(_with_busy_worker(tight, late))
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout" and "still queued" in r.text
    assert dt < 5
    text = httpx.get(f"{tight.url}/metrics", headers=AUTH).text
    assert metric(text, "dream_jobs_dropped_total", reason="timeout") >= 1
    assert httpx.post(f"{tight.url}/v1/generate", json={"prompts": ["a"]}, headers=AUTH, timeout=60).status_code == 200


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_finishes_in_flight_requests_then_exits_0(servers):
    srv = servers["drain"].wait_ready()

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            body = {"steps": 32, "num_candidates": 4}
            tasks = [asyncio.ensure_future(c.post("/v1/generate", json={"prompts": [PROMPTS[i]], "seed": i, **body}))
                     for i in range(4)]
            for _ in range(1000):
                h = (await c.get("/healthz")).json()
                if h["in_flight"] == 4:
                    break
                await asyncio.sleep(0.01)
            assert h["in_flight"] == 4 and h["queue_depth"] >= 1, h  # one batch running, one queued
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            refused = None
            if not all(t.done() for t in tasks):  # draining: no new connections
                try:
                    async with httpx.AsyncClient(timeout=5) as fresh:
                        await fresh.get(f"{srv.url}/healthz")
                    refused = False
                except httpx.TransportError:
                    refused = True
            return await asyncio.gather(*tasks), refused

    rs, refused = asyncio.run(run())
    assert [r.status_code for r in rs] == [200] * 4
    assert all(png(r.json()["images"][0]["b64_png"]).shape == (32, 32, 3) for r in rs)
    assert refused in (True, None)
    assert srv.proc.wait(60) == 0, srv.log.read_text()
