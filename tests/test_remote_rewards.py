"""Rewards over HTTP: the protocol's encodings, `diffalign reward serve` (a real uvicorn process on a local
port) against the in-process reward, the client's retries and its errors on bad replies (a stub server),
a training run scored over HTTP (the same weights as in-process), a reward server killed mid-run, and the
VLM-judge client against a small local stand-in speaking the OpenAI chat protocol. No VLM runs here: the
stand-in answers with numbers computed from the image."""

import http.server
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.rewards import RewardError, build_reward
from diffalign.rewards.remote import RewardServerDown, decode_images, encode_images, parse_reply
from diffalign.serve import free_port, spawn


class Server:
    """`diffalign reward serve SPEC` in its own process on `port` (`diffalign.serve.spawn`), stopped and started
    again at will."""

    def __init__(self, spec: str, port: int, *extra):
        self.spec, self.port, self.extra, self.proc = spec, port, extra, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = spawn(self.spec, self.port, *self.extra)
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def served():
    s = Server("classifier", free_port(), "--max-wait-ms", "50").start()
    yield s
    s.stop()


def digits_images(n=24, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_encodings_round_trip():
    x = digits_images(5)
    assert torch.equal(decode_images(encode_images(x, "safetensors"), "safetensors"), x)  # lossless
    png = decode_images(encode_images(x, "png"), "png")
    assert png.shape == x.shape and (png - x).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit steps
    rgb = torch.rand(2, 3, 6, 6)
    assert (decode_images(encode_images(rgb, "png"), "png") - rgb).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="unknown image encoding"):
        encode_images(x, "jpeg")


def test_served_reward_equals_the_in_process_one(served):
    x, prompts = digits_images(24), [str(i % 10) for i in range(24)]
    local, _ = build_reward("classifier")(x, prompts)
    remote = build_reward(f"http(url={served.url}, batch=8, concurrency=3)")
    assert not remote.differentiable
    r, info = remote(x, prompts)
    assert torch.equal(r, local) and "accuracy" in info
    png, _ = build_reward(f"http(url={served.url}, encoding=png)")(x, prompts)
    assert 0 < (png - local).abs().max() < 0.1  # 8-bit images: close, not equal
    meta = requests.get(served.url + "/info").json()
    assert meta["protocol"] == 1 and meta["reward"] == "classifier" and meta["served"] >= 48
    combined, parts = build_reward({f"http(url={served.url})": 1.0, "ink": 0.5})(x, prompts)
    assert torch.allclose(combined, local + 0.5 * build_reward("ink")(x, prompts)[0])
    reply = requests.post(served.url + "/score", json={"prompts": ["1"], "encoding": "safetensors", "images": "AAAA"})
    assert reply.status_code == 400 and "bad request" in reply.json()["error"]


class Stub(http.server.BaseHTTPRequestHandler):
    """Replies from a script: each entry (status, body) is used once, the last one forever."""

    script: list = []
    calls: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.calls.append(body)
        status, reply = Stub.script.pop(0) if len(Stub.script) > 1 else Stub.script[0]
        if callable(reply):
            reply = reply(body)
        data = json.dumps(reply).encode() if not isinstance(reply, bytes) else reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Stub.calls.clear()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_bad_replies_are_named_errors_and_5xx_is_retried(stub):
    _, url = stub
    x, prompts = digits_images(3), ["1", "2", "3"]
    fn = build_reward(f"http(url={url}, retries=2, backoff=0.01)")
    Stub.script = [(503, {"error": "warming up"}), (200, {"rewards": [1.0, 2.0, 3.0]})]
    assert fn(x, prompts)[0].tolist() == [1.0, 2.0, 3.0] and len(Stub.calls) == 2
    Stub.script = [(200, {"rewards": [1.0, 2.0]})]
    with pytest.raises(RewardError, match=rf"reward server {url} replied with 2 rewards for 3 images"):
        fn(x, prompts)
    Stub.script = [(200, {"rewards": [1.0, "high", 3.0]})]
    with pytest.raises(RewardError, match=r"the reward of row 1 is 'high', not a number"):
        fn(x, prompts)
    Stub.script = [(200, b'{"rewards": [1.0, 2.0, NaN]}')]
    with pytest.raises(RewardError, match=r"the reward of row 2 is nan \(not finite\)"):
        fn(x, prompts)
    Stub.script = [(400, {"error": "unknown encoding"})]
    with pytest.raises(RewardError, match="refused the request .HTTP 400.: unknown encoding"):
        fn(x, prompts)
    Stub.script = [(500, {"error": "out of memory"})]
    Stub.calls.clear()
    with pytest.raises(RewardServerDown, match="did not answer after 3 attempts .HTTP 500.*--resume"):
        fn(x, prompts)
    assert len(Stub.calls) == 3
    with pytest.raises(RewardServerDown, match="ConnectionError"):
        build_reward(f"http(url=http://127.0.0.1:{free_port()}, retries=1, backoff=0.01)")(x, prompts)


TRAIN = ["train.epochs=2", "train.batch_size=16", "train.batches_per_epoch=1", "sampling.num_steps=4",
         "eval.per_prompt=2", "eval.reward=null", "args.minibatches=1", "train.checkpoint_every=1"]


def train(out, reward, *extra, resume=False):
    sets = [x for s in TRAIN + [f"reward={reward}", *extra] for x in ("--set", s)]
    cmd = ["train", "--resume", str(out)] if resume else ["train", "configs/ddpo_digits.yaml", *sets, "--out", str(out)]
    return main(cmd)


def lora(run) -> dict:
    return load_file(str(Path(run) / "final" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    assert train(out, "classifier") == 0
    return out


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_scored_over_http_ends_with_the_in_process_weights(served, local_run, tmp_path):
    assert train(tmp_path / "http", f"http(url={served.url}, batch=16)") == 0
    summary = json.loads((tmp_path / "http" / "summary.json").read_text())
    assert summary["reward_queries"] == json.loads((local_run / "summary.json").read_text())["reward_queries"]
    assert same_weights(lora(tmp_path / "http"), lora(local_run))


def run_in_background(out, reward):
    sets = [x for s in TRAIN + [f"reward={reward}"] for x in ("--set", s)]
    cmd = [sys.executable, "-m", "diffalign.cli", "train", "configs/ddpo_digits.yaml", *sets, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as many threads as this process: same floats
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_epoch(out, proc, n=1):
    for _ in range(1200):
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError("the run did not finish an epoch")


def test_a_server_killed_mid_run_is_retried_and_a_server_that_stays_down_stops_after_a_checkpoint(local_run, tmp_path):
    server = Server("classifier", free_port()).start()
    try:
        # killed after the first epoch, back a second later: the client's retries carry the run through
        proc = run_in_background(tmp_path / "retried", f"http(url={server.url}, retries=8, backoff=0.2)")
        wait_for_epoch(tmp_path / "retried", proc)
        server.stop()
        time.sleep(1.0)
        server.start()
        assert proc.wait(timeout=300) == 0, proc.stdout.read()
        assert same_weights(lora(tmp_path / "retried"), lora(local_run))
        # down for good: the run stops with the message, its epoch-1 checkpoint intact; --resume finishes it
        proc = run_in_background(tmp_path / "stopped", f"http(url={server.url}, retries=1, backoff=0.1)")
        wait_for_epoch(tmp_path / "stopped", proc)
        server.stop()
        code, out = proc.wait(timeout=300), proc.stdout.read()
        assert code == 4 and "diffalign: stopped: reward server" in out and "--resume" in out
        assert (tmp_path / "stopped" / "checkpoints").exists() and not (tmp_path / "stopped" / "final").exists()
        server.start()
        assert train(tmp_path / "stopped", None, resume=True) == 0
        assert same_weights(lora(tmp_path / "stopped"), lora(local_run))
    finally:
        server.stop()


def chat_stand_in(body, garble=None):
    """An OpenAI chat completion whose answer is computed from the image: 'Score: 10 x mean brightness', and
    for yes/no prompts logprobs with P(yes) = the brightness. `garble` makes the first n replies unparseable."""
    content = body["messages"][0]["content"]
    png = next(c for c in content if c["type"] == "image_url")["image_url"]["url"].split(",", 1)[1]
    b = float(decode_images([png], "png").mean())
    if garble and garble[0] > 0:
        garble[0] -= 1
        return {"choices": [{"message": {"role": "assistant", "content": "I cannot rate this."}}]}
    if body.get("logprobs"):
        top = [{"token": "Yes", "logprob": math.log(b)}, {"token": "No", "logprob": math.log(1 - b)}]
        return {"choices": [{"message": {"role": "assistant", "content": "Yes"},
                             "logprobs": {"content": [{"token": "Yes", "top_logprobs": top}]}}]}
    return {"choices": [{"message": {"role": "assistant", "content": f"Score: {10 * b:.4f}"}}]}


def test_vlm_judge_against_a_chat_protocol_stand_in(stub):
    _, url = stub
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    bright = decode_images(encode_images(x, "png"), "png").mean(dim=(1, 2, 3))
    Stub.script = [(200, chat_stand_in)]
    judge = build_reward(f"vlm-judge(url={url}, model=stand-in, prompt=score)")
    r, info = judge(x, ["a cat"] * 4)
    assert torch.allclose(r, 10 * bright, atol=1e-3) and info["parse_retries"] == 0
    sent = Stub.calls[0]
    assert sent["model"] == "stand-in" and "a cat" in sent["messages"][0]["content"][1]["text"]
    r, _ = build_reward(f"vlm-judge(url={url}/v1, model=stand-in, prompt=alignment)")(x, ["a cat"] * 4)
    assert torch.allclose(r, bright, atol=1e-4)  # P(yes) from the logprobs
    garble = [2]
    Stub.script = [(200, lambda body: chat_stand_in(body, garble))]
    r, info = build_reward(f"vlm-judge(url={url}, model=m, concurrency=1)")(x, ["a cat"] * 4)
    assert info["parse_retries"] == 2 and torch.allclose(r, 10 * bright, atol=1e-3)
    Stub.script = [(200, lambda body: chat_stand_in(body, [99]))]
    with pytest.raises(RewardError, match=r"the reply for row \d did not parse as number after 3 requests"):
        build_reward(f"vlm-judge(url={url}, model=m, concurrency=1)")(x, ["a cat"] * 4)
    assert parse_reply({"choices": [{"message": {"content": "no"}}]}, "yesno") == 0.0
    with pytest.raises(ValueError, match="needs url"):
        build_reward("vlm-judge(model=m)")
