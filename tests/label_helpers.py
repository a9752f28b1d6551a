"""A labelling server on a free port for the length of a `with` block, a raw HTTP client, and small sets."""

import contextlib
import http.client
import json
import threading

import torch

from diffalign.data import human
from diffalign.data.feedback import save_png
from diffalign.label import make_server


@contextlib.contextmanager
def serving(folder):
    """make_server on port 0 in a thread; stopped (and its port freed) when the block ends."""
    server = make_server(folder, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON or raw bytes). The path is sent as given (no normalisation of '..')."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers={**hdrs, **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    is_json = r.getheader("Content-Type", "").startswith("application/json")
    return r.status, json.loads(data) if is_json else data


def answer(server, item_id, value):
    return request(server, "POST", "/api/answer", {"id": item_id, "answer": value})


def state(server):
    status, s = request(server, "GET", "/api/state")
    assert status == 200
    return s


def digit_like(n, seed=0):
    """n random 8x8 grey images with a bright stroke, different enough to tell apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for i in range(n):
        x[i, 0, 1:7, 1 + i % 6] = 1.0
    return x


def image_round(folder, n=4, run=None):
    """A D3PO round of n image pairs as a run writes it (pairs.json, img/, round.json)."""
    rows = [{"prompt": str(i % 10), "a": ia, "b": ib} for i, (ia, ib) in enumerate(human.image_ids(0, 0, range(n)))]
    human.write_round(folder, rows, digit_like(n, 1), digit_like(n, 2))
    human.write_round_info(folder, run, 0, n)
    return rows


def kto_set(folder, n=3):
    """images.jsonl with n 8x8 PNGs; returns its rows."""
    rows = []
    for i, img in enumerate(digit_like(n)):
        save_png(img, folder / "img" / f"{i}.png")
        rows.append({"prompt": str(i), "image": f"img/{i}.png"})
    (folder / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def candidate_set(folder, prompts=("3", "7"), per_prompt=3):
    """candidates.jsonl: per_prompt PNGs per prompt; returns its rows."""
    rows = []
    for p, prompt in enumerate(prompts):
        files = []
        for j, img in enumerate(digit_like(per_prompt, seed=p)):
            files.append(f"img/{p}_{j}.png")
            save_png(img, folder / files[-1])
        rows.append({"prompt": prompt, "images": files})
    (folder / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
