"""`diffalign reward serve SPEC`: any diffalign reward behind the HTTP protocol of
`diffalign.rewards.remote` (its docstring states it), so runs on other machines score with
`reward: http(url=...)`.

The server is Starlette on uvicorn (an ASGI stack: one event loop holds many open connections
cheaply, and the reward runs in one worker thread). Requests that arrive together are batched: the
worker takes every request waiting (up to `max_batch` images, after waiting `max_wait_ms` for more)
and scores them in one call, then answers each with its own rows. It binds to 127.0.0.1 unless
told otherwise: the protocol has no authentication, so expose it only on a network you trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from .rewards import RewardError, build_reward
from .rewards.remote import ENCODINGS, PROTOCOL, decode_images


@dataclass
class Job:
    images: torch.Tensor
    prompts: list
    metadata: dict | None
    done: asyncio.Future = field(default=None)


def make_app(spec: str, device: str = "cpu", max_batch: int = 256, max_wait_ms: float = 5.0):
    """The ASGI app serving reward `spec` (built once, on `device`)."""
    import importlib.util

    if not (importlib.util.find_spec("starlette") and importlib.util.find_spec("uvicorn")):
        raise ValueError("`diffalign reward serve` needs Starlette and uvicorn: pip install 'diffalign[serve]'")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    reward = build_reward(spec, device=device)
    lock = threading.Lock()  # one reward call at a time
    state = {"queue": None, "worker": None, "served": 0, "batches": 0}

    def score(jobs: list[Job]):
        images = torch.cat([j.images for j in jobs]).to(device)
        prompts = [p for j in jobs for p in j.prompts]
        with lock, torch.no_grad():
            r, info = reward(images, prompts, jobs[0].metadata if len(jobs) == 1 else None)
        info = {k: float(v) for k, v in info.items() if torch.is_tensor(v) and v.numel() == 1
                or isinstance(v, (int, float))}
        return r.detach().float().cpu().tolist(), info

    async def worker():
        queue = state["queue"]
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            n = len(jobs[0].prompts)
            deadline = loop.time() + max_wait_ms / 1000
            while n < max_batch:
                try:
                    job = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                n += len(job.prompts)
            try:
                rewards, info = await loop.run_in_executor(None, score, jobs)
            except Exception as e:  # the reward failed: every waiting request gets the error
                for j in jobs:
                    if not j.done.done():
                        j.done.set_exception(e)
                continue
            state["served"] += n
            state["batches"] += 1
            lo = 0
            for j in jobs:
                if not j.done.done():
                    j.done.set_result((rewards[lo:lo + len(j.prompts)], info))
                lo += len(j.prompts)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["queue"] = asyncio.Queue()
        state["worker"] = asyncio.create_task(worker())
        yield
        state["worker"].cancel()

    async def info(request):
        return JSONResponse({"protocol": PROTOCOL, "reward": reward.name, "description": reward.description,
                             "differentiable": False, "encodings": list(ENCODINGS), "max_batch": max_batch,
                             "served": state["served"], "batches": state["batches"]})

    async def score_route(request):
        try:
            body = await request.json()
            encoding = body.get("encoding", "safetensors")
            if encoding not in ENCODINGS:
                raise ValueError(f"unknown encoding {encoding!r}: this server takes {', '.join(ENCODINGS)}")
            prompts = body.get("prompts")
            images = decode_images(body["images"], encoding)
            if not isinstance(prompts, list) or len(prompts) != len(images):
                raise ValueError(f"{len(images)} images need as many prompts, got "
                                 f"{len(prompts) if isinstance(prompts, list) else type(prompts).__name__}")
        except Exception as e:  # noqa: BLE001 - whatever does not decode is the request's fault
            return JSONResponse({"error": f"bad request: {type(e).__name__}: {e}"}, status_code=400)
        job = Job(images, [str(p) for p in prompts], body.get("metadata"), asyncio.get_running_loop().create_future())
        await state["queue"].put(job)
        try:
            rewards, extra = await job.done
        except RewardError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        except Exception as e:  # noqa: BLE001 - the server reports it and keeps serving
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse({"rewards": rewards, "info": extra})

    return Starlette(routes=[Route("/info", info), Route("/score", score_route, methods=["POST"])],
                     lifespan=lifespan)


def serve(spec: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", max_batch: int = 256,
          max_wait_ms: float = 5.0) -> None:
    """Serve reward `spec` until interrupted."""
    app = make_app(spec, device, max_batch, max_wait_ms)
    import uvicorn

    print(f"serving reward {spec!r} on http://{host}:{port} (POST /score, GET /info); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(spec: str, port: int, *extra: str, timeout: float = 60.0) -> subprocess.Popen:
    """`diffalign reward serve SPEC --port PORT [extra]` in its own process, returned once it answers /info."""
    import requests

    proc = subprocess.Popen([sys.executable, "-m", "diffalign.cli", "reward", "serve", spec, "--port", str(port),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/info", timeout=1).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"`diffalign reward serve {spec}` did not answer on port {port} within {timeout:.0f} s")
