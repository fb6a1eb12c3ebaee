"""`dream-fast serve`: load a bundle once and serve generation and embeddings over HTTP (uvicorn),
with dynamic batching, a bounded queue and a graceful SIGTERM drain (docs/serving.md)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

API_KEY_ENV = "DREAM_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="inference bundle directory (from `dream-fast export`)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"bearer token required on every route but /healthz (default: ${API_KEY_ENV})")
    p.add_argument("--max-batch", type=int, default=8, help="most prompts coalesced into one sampler call")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the oldest queued request waits for others to join its batch")
    p.add_argument("--fixed-batch", choices=["auto", "on", "off"], default="auto",
                   help="pad every model call to --max-batch rows: a prompt's image is then bit-identical "
                        "alone or batched, on any device (auto: on for CUDA, where padding is nearly free; "
                        "off on CPU, where a lone request then costs a full batch)")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests past which new ones get 503")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-request deadline (504 past it)")
    p.add_argument("--max-prompts", type=int, default=16, help="prompts per /v1/generate request")
    p.add_argument("--model-name", default=None, help="name reported by /v1/models (default: bundle folder name)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the sampler eagerly on CUDA")
    p.add_argument("--warmup-batches", default="1,max",
                   help="batch sizes sampled once at start with the default settings (CUDA graphs are "
                        "captured then), comma-separated, 'max' = --max-batch; '' for none")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _warmup_batches(spec: str, max_batch: int) -> tuple[int, ...]:
    out = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        n = max_batch if part == "max" else int(part) if part.isdigit() else None
        if n is None or not 1 <= n <= max_batch:
            raise ValueError(f"--warmup-batches entries must be 'max' or integers in [1, {max_batch}], got {part!r}")
        out.append(n)
    return tuple(dict.fromkeys(out))


def main(args: argparse.Namespace) -> int:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise ValueError(
            f"--host {args.host} is not a loopback address: give --api-key KEY (or set ${API_KEY_ENV}) so "
            "every route but /healthz needs 'Authorization: Bearer KEY', or bind to 127.0.0.1"
        )
    for name, v, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                        ("--max-prompts", args.max_prompts, 1), ("--port", args.port, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if args.max_wait_ms < 0 or args.timeout_s <= 0:
        raise ValueError(f"--max-wait-ms must be >= 0 and --timeout-s > 0, got {args.max_wait_ms}, {args.timeout_s}")
    warm = _warmup_batches(args.warmup_batches, args.max_batch)
    try:
        import uvicorn
    except ImportError:
        raise ValueError("`dream-fast serve` needs the serve extra: pip install 'dream-fast[serve]'") from None
    import torch

    from dream_fast.sampling.pipeline import DreamPipeline
    from dream_fast.serve.app import ServeConfig, create_app
    from dream_fast.serve.engine import Engine, GenSettings, Runner
    from dream_fast.serve.metrics import ServeMetrics

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = DreamPipeline.from_pretrained(args.checkpoint, device=args.device, dtype=dtype,
                                         use_cuda_graphs=False if args.no_cuda_graphs else None)
    name = args.model_name or Path(args.checkpoint).resolve().name
    metrics = ServeMetrics()
    fixed = args.fixed_batch == "on" or (args.fixed_batch == "auto" and pipe.device.type == "cuda")
    runner = Runner(pipe, fixed_batch=args.max_batch if fixed else None)
    if fixed and warm:
        warm = (args.max_batch,)  # every call has that shape
    engine = Engine(runner, metrics, args.max_batch, args.max_wait_ms, args.max_queue,
                    warmup=GenSettings(**pipe.resolve()), warmup_batches=warm)
    cfg = ServeConfig(model_name=name, api_key=api_key, timeout_s=args.timeout_s, max_prompts=args.max_prompts)
    app = create_app(engine, pipe, cfg)
    log.info("serving %s on http://%s:%d (device %s, max batch %d%s, max wait %g ms, queue %d)", name, args.host,
             args.port, pipe.device, args.max_batch, " fixed" if fixed else "", args.max_wait_ms, args.max_queue)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=None, lifespan="on")
    server = _Server(config)
    server.run()
    return 0 if server.started else 1


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server (SIGTERM/SIGINT: stop accepting, finish in-flight requests, lifespan
        shutdown), except that the process then exits 0: uvicorn re-raises the captured signal."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server


def _Server(config):
    return _server_class()(config)
