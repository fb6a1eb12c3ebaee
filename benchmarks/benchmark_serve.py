"""`dream-fast serve` under load: 1 / 4 / 16 concurrent closed-loop clients against a batching server
and against one-request-at-a-time serving of the same bundle (--max-batch 1), in the same run.

Prints throughput (images/s) and p50/p95/p99 latency per (server, clients), the ratio of batched to
one-at-a-time throughput, and the issue-18 targets. Each client sends one-prompt /v1/generate requests
back to back. The bundle is the tiny preset (random weights: the cost does not depend on them).

    python -m benchmarks.benchmark_serve --threads 2 --out benchmarks/results/DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a large green triangle in the bottom right on a navy background",
    "a small purple triangle in the bottom right on a white background",
    "a large orange circle in the center on a white background",
    "a large cyan circle at the top on a navy background",
]


def make_bundle(path: Path) -> Path:
    import torch

    from dream_fast.config import get_preset
    from dream_fast.data import BPETokenizer, make_sample
    from dream_fast.model.dream import build_model
    from dream_fast.pretrained import save_pretrained

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    tok = BPETokenizer.train([make_sample(0, "train", i)[1] for i in range(400)], cfg.model.vocab_size)
    model.set_text_specials(tok.eot_id, tok.encode([""], cfg.model.text_context)[0])
    return save_pretrained(model.state_dict(), cfg, tok, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bundle: Path, threads: int, log: Path, *args: str):
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dream_fast.cli", "serve", "--checkpoint", str(bundle), "--port", str(port),
           "--log-level", "warning", *args]
    f = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server not ready in 300 s")


async def load(url: str, clients: int, requests: int, body: dict) -> dict:
    """`clients` closed-loop clients share `requests` requests; latency per request, wall throughput."""
    import httpx

    lat: list[float] = []
    todo = list(range(requests))
    batch_sizes: list[int] = []

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            while todo:
                i = todo.pop()
                t = time.perf_counter()
                r = await c.post("/v1/generate", json={"prompts": [PROMPTS[i % 4]], "seed": i, **body})
                r.raise_for_status()
                lat.append(time.perf_counter() - t)
                batch_sizes.append(r.json()["timings"]["batch_prompts"])

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    q = np.percentile(np.array(lat), [50, 95, 99])
    return {"clients": clients, "requests": requests, "images_per_s": requests / wall, "p50_s": q[0], "p95_s": q[1],
            "p99_s": q[2], "mean_batch": float(np.mean(batch_sizes))}


def plain_pipeline(bundle: Path, threads: int, n: int, body: dict) -> float:
    """Images/s of DreamPipeline called one prompt at a time in this process (no HTTP, no queue)."""
    import torch

    from dream_fast.sampling.pipeline import DreamPipeline

    torch.set_num_threads(threads)
    pipe = DreamPipeline.from_pretrained(bundle, device="cpu")
    pipe([PROMPTS[0]], seed=0, progress=False, **body)
    t0 = time.perf_counter()
    for i in range(n):
        pipe([PROMPTS[i % 4]], seed=i, progress=False, **body)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each server")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests = max(6, this x clients)")
    p.add_argument("--num-candidates", type=int, default=None,
                   help="SAD K per request (default: the preset's own, 5; 1 = plain MAR sampling, ~1/2 the work)")
    p.add_argument("--steps", type=int, default=None, help="generation steps (default: the preset's 16)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--out", default=None, help="folder for results.json and table.md")
    a = p.parse_args(argv)
    clients = [int(c) for c in a.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    bundle = make_bundle(tmp / "tiny")
    from dream_fast.config import get_preset

    s = get_preset("tiny").sample
    steps = a.steps or s.num_iter
    K = s.num_candidates if a.num_candidates is None else a.num_candidates
    body: dict = {"num_candidates": K, "steps": steps}
    sad = f"SAD K={K}" if K > 1 else "K=1 (no SAD)"
    settings = f"steps {steps}, {sad}, cfg {s.cfg} ({s.cfg_schedule}), temperature {s.temperature}"
    servers = {
        "batched": ("--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), "--fixed-batch", "off"),
        "one-at-a-time": ("--max-batch", "1", "--max-wait-ms", "0"),
    }
    rows = []
    plain = plain_pipeline(bundle, a.threads, 6, body)
    print(f"plain DreamPipeline, one prompt per call, in-process: {plain:.2f} img/s", flush=True)
    try:
        load_before = os.getloadavg()
    except OSError:
        load_before = None
    for name, args in servers.items():
        proc, url = start(bundle, a.threads, tmp / f"{name}.log", *args)
        try:
            asyncio.run(load(url, 1, 2, body))  # warm the connection path
            for c in clients:
                r = asyncio.run(load(url, c, max(6, a.requests_per_client * c), body))
                r["server"] = name
                rows.append(r)
                print(f"{name:14s} clients {c:2d}: {r['images_per_s']:.2f} img/s  p50 {r['p50_s']:.3f} s  "
                      f"p95 {r['p95_s']:.3f} s  p99 {r['p99_s']:.3f} s  mean batch {r['mean_batch']:.1f}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    try:
        load_after = os.getloadavg()
    except OSError:
        load_after = None
    one = {r["clients"]: r for r in rows if r["server"] == "one-at-a-time"}
    bat = {r["clients"]: r for r in rows if r["server"] == "batched"}
    lone = bat[clients[0]]["p50_s"] if clients[0] == 1 else None
    lines = [
        f"tiny preset, {settings}; {a.threads} threads per server; batched = --max-batch {a.max_batch} "
        f"--max-wait-ms {a.max_wait_ms:g}",
        "",
        "| clients | batched img/s | one-at-a-time img/s | ratio | batched p50 / p95 / p99 s "
        "| one-at-a-time p50 / p95 / p99 s | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in clients:
        b, o = bat[c], one[c]
        lines.append(
            f"| {c} | {b['images_per_s']:.2f} | {o['images_per_s']:.2f} | {b['images_per_s'] / o['images_per_s']:.2f}x "
            f"| {b['p50_s']:.3f} / {b['p95_s']:.3f} / {b['p99_s']:.3f} | {o['p50_s']:.3f} / {o['p95_s']:.3f} / "
            f"{o['p99_s']:.3f} | {b['mean_batch']:.1f} |"
        )
    if lone is not None and 16 in bat:
        ratio = bat[16]["images_per_s"] / one[16]["images_per_s"]
        bound = 2 * lone + a.max_wait_ms / 1000
        lines += [
            "",
            f"- target 16 clients >= 2.5x one-at-a-time throughput: {ratio:.2f}x "
            f"({'met' if ratio >= 2.5 else 'NOT met'})",
            f"- target p99 <= 2 x lone ({lone:.3f} s) + max-wait = {bound:.3f} s: 1 client p99 {bat[1]['p99_s']:.3f} s "
            f"({'met' if bat[1]['p99_s'] <= bound else 'NOT met'}); 16 clients p99 {bat[16]['p99_s']:.3f} s "
            f"({'met' if bat[16]['p99_s'] <= bound else 'NOT met'}: 16 closed-loop clients wait at least "
            f"16 / throughput = {16 / bat[16]['images_per_s']:.3f} s by Little's law)",
        ]
    lines.append(f"- plain DreamPipeline in-process, one prompt per call: {plain:.2f} img/s (no HTTP, no queue)")
    lines.append(f"- load average before {load_before}, after {load_after}")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"rows": rows, "settings": settings, "threads": a.threads,
                                                      "load_before": load_before, "load_after": load_after,
                                                      "plain_pipeline_images_per_s": plain},
                                                     indent=2))
        (out / "table.md").write_text(table + "\n")
        print(f"wrote {out}/results.json and table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
