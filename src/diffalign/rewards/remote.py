"""Rewards on another machine: `http(url=...)` speaks diffalign's reward protocol (served by
`diffalign reward serve`, `diffalign.serve`), `vlm-judge(url=...)` asks an OpenAI-compatible chat endpoint
(what vLLM and sglang serve) to score each image.

The protocol (version 1), JSON over HTTP:

- `GET  {url}/info` -> `{"protocol": 1, "reward": name, "description": str, "differentiable": false,
  "encodings": ["safetensors", "png"]}`
- `POST {url}/score` with `{"prompts": [str] * N, "encoding": "safetensors" | "png", "images": ...,
  "metadata": {...} | null}`, where `images` is, for "safetensors", the base64 of a safetensors file
  holding one float32 tensor `images` (N, C, H, W) in [0, 1] (lossless: the exact floats the trainer
  holds), and for "png", a list of N base64 8-bit PNGs (for rewards trained on 8-bit images).
  Reply: `{"rewards": [float] * N, "info": {key: number}}`; an error is a non-2xx status with
  `{"error": message}`.

The client sends `batch` images per request, up to `concurrency` requests at once, and retries
connection errors, timeouts and 5xx replies `retries` times with exponential backoff; after that it
raises `RewardServerDown`, which stops the run with the last checkpoint intact (`--resume` continues).
A reply with the wrong count, a non-number or NaN is a `RewardError` naming the server and the row.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from . import RewardError, register

PROTOCOL = 1
ENCODINGS = ("safetensors", "png")


class RewardServerDown(RuntimeError):
    """A reward server did not answer after every retry: the run stops, its last checkpoint intact."""


# ---- encoding -------------------------------------------------------------------------------------
def encode_images(images: torch.Tensor, encoding: str):
    """Images (N, C, H, W) in [0, 1] as the protocol's `images` field."""
    x = images.detach().float().cpu().contiguous()
    if encoding == "safetensors":
        from safetensors.torch import save

        return base64.b64encode(save({"images": x})).decode()
    if encoding == "png":
        from PIL import Image

        out = []
        for img in (x.clamp(0, 1) * 255).round().to(torch.uint8):
            arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return out
    raise ValueError(f"unknown image encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")


def decode_images(data, encoding: str) -> torch.Tensor:
    """The inverse of `encode_images` (PNGs come back as float32 in [0, 1], 8-bit steps)."""
    if encoding == "safetensors":
        from safetensors.torch import load

        return load(base64.b64decode(data))["images"]
    if encoding == "png":
        import numpy as np
        from PIL import Image

        imgs = []
        for item in data:
            arr = np.array(Image.open(io.BytesIO(base64.b64decode(item))))
            t = torch.from_numpy(arr).float() / 255
            imgs.append(t[None] if t.ndim == 2 else t.permute(2, 0, 1))
        return torch.stack(imgs)
    raise ValueError(f"unknown image encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")


# ---- one request with retries -----------------------------------------------------------------
def post_json(session, url: str, body: dict, timeout: float, retries: int, backoff: float, what: str) -> dict:
    """POST `body`; connection errors, timeouts and 5xx are retried with backoff·2^k waits, then
    `RewardServerDown`; a 4xx reply is an error with the server's message."""
    import requests

    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            r = session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"},
                             timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            last = f"{type(e).__name__}: {e}"
            continue
        if r.status_code >= 500:
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            continue
        if r.status_code >= 400:
            raise RewardError(f"{what} {url} refused the request (HTTP {r.status_code}): {_message(r)}")
        try:
            return r.json()
        except ValueError:
            raise RewardError(f"{what} {url} replied with something that is not JSON: {r.text[:200]!r}") from None
    raise RewardServerDown(f"{what} {url} did not answer after {retries + 1} attempts ({last}). The run stops here "
                           "with its last checkpoint intact: start the server again and rerun with --resume")


def _message(r) -> str:
    try:
        return str(r.json().get("error", r.text[:200]))
    except ValueError:
        return r.text[:200]


def as_rewards(values, n: int, offset: int, url: str) -> list[float]:
    """The reply's rewards checked: n finite numbers, else an error naming the server and the row."""
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} rewards" if isinstance(values, list) else f"{type(values).__name__}"
        raise RewardError(f"reward server {url} replied with {got} for {n} images (rows {offset}..{offset + n - 1})")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RewardError(f"reward server {url}: the reward of row {offset + i} is {v!r}, not a number")
        if not math.isfinite(v):
            raise RewardError(f"reward server {url}: the reward of row {offset + i} is {v} (not finite)")
        out.append(float(v))
    return out


# ---- the http reward ----------------------------------------------------------------------------
def http_reward(url: str, batch: int = 64, timeout: float = 60.0, retries: int = 5, encoding: str = "safetensors",
                concurrency: int = 4, backoff: float = 0.5):
    """fn(images, prompts, metadata) scoring over HTTP (the module docstring's protocol)."""
    import requests

    if not url:
        raise ValueError("reward 'http' needs url=..., e.g. http(url=http://127.0.0.1:8000)")
    if encoding not in ENCODINGS:
        raise ValueError(f"reward 'http': encoding={encoding!r}: choose one of {', '.join(ENCODINGS)}")
    if batch < 1 or concurrency < 1 or retries < 0:
        raise ValueError("reward 'http': batch and concurrency must be >= 1, retries >= 0")
    base = url.rstrip("/")
    session = requests.Session()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="diffalign-reward")

    def one(lo: int, images, prompts, metadata):
        body = {"prompts": list(prompts), "encoding": encoding, "images": encode_images(images, encoding),
                "metadata": _jsonable(metadata)}
        reply = post_json(session, base + "/score", body, timeout, retries, backoff, "reward server")
        if not isinstance(reply, dict):
            raise RewardError(f"reward server {url} replied with {type(reply).__name__}, not an object")
        return as_rewards(reply.get("rewards"), len(prompts), lo, url), reply.get("info") or {}

    def fn(images, prompts, metadata=None):
        n = len(prompts)
        chunks = [(lo, images[lo:lo + batch], prompts[lo:lo + batch]) for lo in range(0, n, batch)]
        results = list(pool.map(lambda c: one(c[0], c[1], c[2], metadata), chunks))
        rewards = torch.tensor([r for rs, _ in results for r in rs], dtype=torch.float32, device=images.device)
        info = {}
        for key in {k for _, inf in results for k in inf}:
            vals = [float(inf[key]) for _, inf in results if isinstance(inf.get(key), (int, float))]
            if vals:
                info[key] = sum(vals) / len(vals)
        return rewards, info

    return fn


def _jsonable(metadata):
    if metadata is None:
        return None
    try:
        json.dumps(metadata)
        return metadata
    except TypeError:
        return None  # tensors and other objects stay on this side


@register("http", description="a reward served over HTTP by `diffalign reward serve` (or any server speaking its "
          "protocol: docs/real-models.md); url=..., batch=64, timeout=60, retries=5, encoding=safetensors (lossless) or png, "
          "concurrency=4; not differentiable", differentiable=False)
def _http(device="cpu", url: str = "", batch: int = 64, timeout: float = 60.0, retries: int = 5,
          encoding: str = "safetensors", concurrency: int = 4, backoff: float = 0.5):
    return http_reward(url, int(batch), float(timeout), int(retries), encoding, int(concurrency), float(backoff))


# ---- VLM judges over the OpenAI chat protocol -----------------------------------------------------
TEMPLATES = {
    "score": ("Rate how well this image matches the description \"{prompt}\" and how good it looks, on a scale "
              "from 0 to 10. Answer with the number only.", "number"),
    "alignment": ("Does this image show \"{prompt}\"? Answer yes or no.", "yesno"),
    "quality": ("Rate the visual quality of this image (sharpness, composition, artifacts) from 1 to 5. "
                "Answer with the number only.", "number"),
}
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_reply(reply: dict, parse: str):
    """A number from one chat completion, or None when it cannot be parsed. `number`: the first number in
    the text. `yesno`: P(yes) / (P(yes) + P(no)) from the first token's top logprobs when the server returns
    them, else 1 for a yes and 0 for a no."""
    try:
        choice = reply["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return None
    if parse == "number":
        m = NUMBER.search(text)
        return float(m.group()) if m else None
    top = (((choice.get("logprobs") or {}).get("content") or [{}])[0] or {}).get("top_logprobs") or []
    p = {"yes": 0.0, "no": 0.0}
    for item in top:
        word = str(item.get("token", "")).strip().lower()
        if word in p:
            p[word] += math.exp(float(item.get("logprob", -math.inf)))
    if p["yes"] + p["no"] > 0:
        return p["yes"] / (p["yes"] + p["no"])
    word = text.strip().lower()
    return 1.0 if word.startswith("yes") else 0.0 if word.startswith("no") else None


def vlm_judge(url: str, model: str, prompt: str = "score", parse: str | None = None, timeout: float = 120.0,
              retries: int = 5, concurrency: int = 8, parse_retries: int = 2, max_tokens: int = 8,
              temperature: float = 0.0, backoff: float = 0.5, api_key_env: str = "OPENAI_API_KEY"):
    """fn(images, prompts, metadata): one chat request per image (`prompt`: a template name or text with
    {prompt}); a reply that does not parse is asked again `parse_retries` times, then an error naming the
    row and the reply (never a silent zero); info['parse_retries'] counts the repeated requests."""
    import os

    import requests

    if not url or not model:
        raise ValueError("reward 'vlm-judge' needs url=... (the server's base, e.g. http://gpu-host:8000) and "
                         "model=... (the name the server gives the VLM)")
    text, default_parse = TEMPLATES.get(prompt, (prompt, "number"))
    parse = parse or default_parse
    if parse not in ("number", "yesno"):
        raise ValueError(f"reward 'vlm-judge': parse={parse!r}: choose number or yesno")
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
    session = requests.Session()
    key = os.environ.get(api_key_env)
    if key:
        session.headers["Authorization"] = f"Bearer {key}"
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="diffalign-judge")

    def ask(i: int, png: str, p: str, counter: list):
        body = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
                    {"type": "text", "text": text.replace("{prompt}", p)}]}]}
        if parse == "yesno":
            body.update(logprobs=True, top_logprobs=5)
        for attempt in range(parse_retries + 1):
            reply = post_json(session, endpoint, body, timeout, retries, backoff, "VLM judge")
            value = parse_reply(reply, parse)
            if value is not None and math.isfinite(value):
                return value
            counter.append(1)
        shown = json.dumps(reply)[:300]
        raise RewardError(f"VLM judge {endpoint}: the reply for row {i} did not parse as {parse} after "
                          f"{parse_retries + 1} requests: {shown}")

    def fn(images, prompts, metadata=None):
        pngs = encode_images(images, "png")
        counter: list = []
        values = list(pool.map(lambda a: ask(a[0], a[1], a[2], counter), zip(range(len(pngs)), pngs, prompts)))
        return torch.tensor(values, dtype=torch.float32, device=images.device), {"parse_retries": float(len(counter))}

    return fn


@register("vlm-judge", description="a VLM behind an OpenAI-compatible chat endpoint (vLLM, sglang) scores each image: "
          "url=..., model=..., prompt=score|alignment|quality or your text with {prompt}, parse=number|yesno "
          "(yes/no from logprobs); parse failures asked again, then an error; not differentiable",
          differentiable=False)
def _vlm_judge(device="cpu", url: str = "", model: str = "", prompt: str = "score", parse: str | None = None,
               timeout: float = 120.0, retries: int = 5, concurrency: int = 8, parse_retries: int = 2,
               max_tokens: int = 8, temperature: float = 0.0):
    return vlm_judge(url, model, prompt, parse, float(timeout), int(retries), int(concurrency), int(parse_retries),
                     int(max_tokens), float(temperature))
