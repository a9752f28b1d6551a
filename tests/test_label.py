"""`diffalign label`: the HTTP server and the files it writes, read back by the trainers' own readers."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from label_helpers import answer, candidate_set, image_round, kto_set, request, serving, state
from safetensors.torch import load_file
from test_human_labels import TOY, label_like_the_reward

from diffalign.cli import main
from diffalign.data.feedback import load_feedback, load_labels, load_pairs
from diffalign.data.human import LabelsNeeded
from diffalign.label import LabelSetError, open_set
from diffalign.train import resolve_config, train


def test_a_d3po_round_labelled_in_the_page_trains_like_the_reward(tmp_path):
    """Stop for labels, answer over HTTP (with an undo and a server restart in between), resume, train."""
    one_epoch = dict(TOY, train=dict(TOY["train"], epochs=1))
    cfg, args = resolve_config(base=one_epoch)
    train(cfg, args, tmp_path / "reward")

    labels = tmp_path / "labels"
    cfg, args = resolve_config(base=dict(one_epoch, args=dict(TOY["args"], labels=str(labels))))
    run, r0 = tmp_path / "human", labels / "epoch-0000"
    with pytest.raises(LabelsNeeded, match=f"`diffalign label {r0}`") as e:
        train(cfg, args, run)
    assert f"diffalign train --resume {run}" in str(e.value)
    assert json.loads((r0 / "round.json").read_text())["run"] == str(run.resolve())
    want = {(x["a"], x["b"]): x["choice"] for x in label_like_the_reward(r0)}  # what a careful person answers
    (r0 / "labels.json").unlink()

    with serving(labels) as server:  # the args.labels folder opens its newest round
        s = state(server)
        assert (s["kind"], s["done"], s["total"]) == ("d3po", 0, 8)
        for _ in range(3):
            item = s["item"]
            assert answer(server, item["id"], want[(item["a"], item["b"])])[0] == 200
            s = state(server)
        wrong = s["item"]
        assert answer(server, wrong["id"], "tie" if want[(wrong["a"], wrong["b"])] != "tie" else "a")[0] == 200
        status, s = request(server, "POST", "/api/undo", {})
        assert status == 200 and s["done"] == 3 and s["item"]["id"] == wrong["id"]
    assert not (r0 / "labels.json").exists()  # a partial round is never the trainer's file
    assert len(json.loads((r0 / "answers.json").read_text())) == 3
    with pytest.raises(LabelsNeeded, match=r"\(3 answered so far\)"):
        train(cfg, args, run, resume=True)

    with serving(r0) as server:  # reopened: continues at the fourth pair
        s = state(server)
        assert s["done"] == 3 and s["item"]["id"] == wrong["id"]
        while s["item"]:
            status, s = answer(server, s["item"]["id"], want[(s["item"]["a"], s["item"]["b"])])
            assert status == 200
        assert s["done"] == 8 and s["written"] == "labels.json"
        assert f"diffalign train --resume {run}" in s["next"]
        assert request(server, "POST", "/api/undo", {})[0] == 200
        assert not (r0 / "labels.json").exists()  # incomplete again
        item = state(server)["item"]
        assert answer(server, item["id"], want[(item["a"], item["b"])])[0] == 200
    written = json.loads((r0 / "labels.json").read_text())
    assert {(x["a"], x["b"]): x["choice"] for x in written} == want

    s = train(cfg, args, run, resume=True)  # the page's file is what the trainer reads: no other step
    assert s["finished"] and s["reward_queries"] == 0
    a = load_file(str(tmp_path / "reward" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_a_labels_json_written_by_hand_is_where_the_page_starts(tmp_path):
    rows = image_round(tmp_path, n=3)
    (tmp_path / "labels.json").write_text(json.dumps([dict(rows[1], choice="b")]))
    s = open_set(tmp_path)
    assert s.answers == {f"{rows[1]['a']}|{rows[1]['b']}": "b"}
    s.answer(s.state()["item"]["id"], "a")
    assert not (tmp_path / "labels.json").exists()  # two pairs of three: not a finished round
    s.answer(s.state()["item"]["id"], "tie")
    assert [x["choice"] for x in json.loads((tmp_path / "labels.json").read_text())] == ["a", "b", "tie"]
    (tmp_path / "answers.json").unlink()
    (tmp_path / "labels.json").write_text(json.dumps([dict(rows[0], a="e9999-b00-i0000-a", choice="a")]))
    with pytest.raises(LabelSetError, match="not in this round"):
        open_set(tmp_path)


def test_a_round_of_several_processes_is_one_set(tmp_path):
    from diffalign.data import human
    from label_helpers import digit_like

    ids = human.image_ids(0, 0, range(4))
    for rank in (0, 1):
        rows = [{"prompt": "1", "a": a, "b": b} for a, b in ids[2 * rank:2 * rank + 2]]
        human.write_round(tmp_path, rows, digit_like(2), digit_like(2, 1), part=rank)
    s = open_set(tmp_path)
    assert [it["a"] for it in s.items] == [a for a, _ in ids] and s.run is None
    for it in s.items:
        s.answer(it["id"], "b")
    assert "diffalign train --resume RUN" in s.state()["next"]
    a_wins, keep = human.read_labels(tmp_path / "labels.json", [{"prompt": "1", "a": a, "b": b} for a, b in ids])
    assert not a_wins.any() and keep.all()


def test_an_answer_that_cannot_be_written_is_not_counted(tmp_path):
    kto_set(tmp_path, n=2)
    with serving(tmp_path) as server:
        (tmp_path / "answers.json").mkdir()  # os.replace onto a folder fails
        status, err = answer(server, state(server)["item"]["id"], "skip")
        assert status == 500 and "could not write" in err["error"]
        assert state(server)["done"] == 0


def test_kto_set_writes_what_diffusion_kto_reads(tmp_path):
    rows = kto_set(tmp_path, n=4)
    with serving(tmp_path) as server:
        s = state(server)
        assert s["kind"] == "kto" and s["item"]["images"] == [rows[0]["image"]]
        for value in ("desirable", "skip", "undesirable"):
            status, s = answer(server, s["item"]["id"], value)
            assert status == 200
        got = load_labels(tmp_path / "labels.jsonl")  # usable at any size: written after every answer
        assert got.prompts == ["0", "2"] and got.desirable.tolist() == [True, False]
        assert got.images.shape == (2, 1, 8, 8)
        status, s = answer(server, s["item"]["id"], "desirable")
        assert s["done"] == 4 and "args.data=" in s["next"] and "diffusion_kto" in s["next"]
    got = load_feedback(tmp_path / "labels.jsonl")
    assert got.prompts == ["0", "2", "3"] and got.desirable.tolist() == [True, False, True]
    assert [f.name for f in got.files] == ["0.png", "2.png", "3.png"]


def test_candidates_write_the_pairs_diffusion_dpo_reads(tmp_path):
    rows = candidate_set(tmp_path, prompts=("3", "7", "1"), per_prompt=3)
    with serving(tmp_path) as server:
        s = state(server)
        assert s["kind"] == "candidates" and s["item"]["images"] == rows[0]["images"]
        before = (tmp_path / "answers.json").exists()
        for bad, message in [({"best": 1, "worst": 1}, "must differ"), ({"best": 0, "worst": 3}, "indices in 0..2"),
                             ({"best": True, "worst": 0}, "indices"), ({"best": 0}, "indices"), ("b", "one of")]:
            status, err = answer(server, s["item"]["id"], bad)
            assert status == 400 and message in err["error"]
        assert (tmp_path / "answers.json").exists() == before
        assert answer(server, rows[0]["images"][0], {"best": 2, "worst": 0})[0] == 400  # an image is not an id
        assert answer(server, s["item"]["id"], {"best": 2, "worst": 0})[0] == 200
        assert answer(server, state(server)["item"]["id"], "skip")[0] == 200
        status, s = answer(server, state(server)["item"]["id"], {"best": 0, "worst": 1})
        assert s["done"] == 3 and "diffusion_dpo" in s["next"]
    got = load_pairs(tmp_path / "pairs.jsonl")
    assert got.prompts == ["3", "1"]
    assert got.winner_paths == [rows[0]["images"][2], rows[2]["images"][0]]
    assert got.loser_paths == [rows[0]["images"][0], rows[2]["images"][1]]
    assert (tmp_path / "pairs.jsonl").read_text().splitlines()[0] == json.dumps(
        {"prompt": "3", "chosen": rows[0]["images"][2], "rejected": rows[0]["images"][0]})


def test_only_the_sets_images_inside_the_folder_are_served(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    rows = kto_set(folder, n=2)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the page")
    (folder / "img" / "link.png").symlink_to(secret)
    with serving(folder) as server:
        status, body = request(server, "GET", "/img/" + rows[0]["image"])
        assert status == 200 and body == (folder / rows[0]["image"]).read_bytes()
        status, page = request(server, "GET", "/")
        assert status == 200 and b"image-rendering: pixelated" in page
        for path in ["/img/../secret.png", "/img/img/../../secret.png", "/img/%2e%2e/secret.png",
                     "/img/img%2f%2e%2e%2f%2e%2e%2fsecret.png", "/img/" + str(secret), "/img/" + quote(str(secret)),
                     "/img//" + str(secret), "/../secret.png", "/img/img/link.png", "/img/images.jsonl",
                     "/answers.json", "/img/img/0.png%00", "/img/IMG/0.png"]:
            assert request(server, "GET", path)[0] == 404, path
        os.replace(folder / "img" / "link.png", folder / rows[1]["image"])  # a listed image, now pointing outside
        assert request(server, "GET", "/img/" + rows[1]["image"])[0] == 404
        assert request(server, "GET", "/img/" + rows[0]["image"])[0] == 200


@pytest.mark.parametrize("image", ["../secret.png", "img/link.png", "/abs.png"])
def test_a_set_that_points_outside_its_folder_is_refused_at_start(tmp_path, image):
    folder = tmp_path / "set"
    kto_set(folder.mkdir() or folder, n=1)
    (tmp_path / "secret.png").write_bytes((folder / "img" / "0.png").read_bytes())
    (folder / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    (folder / "images.jsonl").write_text(json.dumps({"prompt": "1", "image": image}) + "\n")
    with pytest.raises(LabelSetError, match=f"line 1: image '{image}' is not a file inside"):
        open_set(folder)


def test_bad_requests_get_400_and_leave_the_files_intact(tmp_path):
    kto_set(tmp_path, n=3)
    with serving(tmp_path) as server:
        item = state(server)["item"]
        assert answer(server, item["id"], "desirable")[0] == 200
        files = {p: (tmp_path / p).read_bytes() for p in ("answers.json", "labels.jsonl")}
        for body, headers, message in [
                ({"id": "img/9.png", "answer": "desirable"}, None, "unknown item id 'img/9.png'"),
                ({"id": item["id"], "answer": "desirable"}, None, "already answered"),
                ({"id": state(server)["item"]["id"], "answer": "yes"}, None, "answer must be one of"),
                ({"id": item["id"]}, None, "JSON object"), ([1, 2], None, "JSON object"),
                ("{not json", None, "not valid JSON"), (b"\xff\xfe", None, "not valid JSON"),
                ({"id": item["id"], "answer": "skip"}, {"Content-Type": "text/plain"}, "application/json"),
                ("x" * 70000, None, "at most")]:
            status, err = request(server, "POST", "/api/answer", body, headers)
            assert status == 400 and message in err["error"], (body, err)
        status, err = request(server, "POST", "/api/answer", {"id": item["id"], "answer": "skip"},
                              {"Host": "evil.example:80"})
        assert status == 403 and "Host" in err["error"]
        assert request(server, "GET", "/api/state", headers={"Host": "evil.example"})[0] == 403
        assert {p: (tmp_path / p).read_bytes() for p in files} == files
        assert state(server)["done"] == 1
        assert request(server, "POST", "/api/undo", {})[0] == 200
        status, err = request(server, "POST", "/api/undo", {})
        assert status == 400 and err["error"] == "nothing to undo"
    assert json.loads((tmp_path / "answers.json").read_text()) == [] and not (tmp_path / "labels.jsonl").exists()


def test_a_folder_without_a_set_is_a_clear_error_at_start(tmp_path, capsys):
    assert main(["label", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["label", str(tmp_path)]) == 2
    assert "holds no feedback set: expected pairs.json" in capsys.readouterr().err
    kto_set(tmp_path, n=1)
    candidate_set(tmp_path)
    assert main(["label", str(tmp_path)]) == 2
    assert "more than one feedback set (images.jsonl, candidates.jsonl)" in capsys.readouterr().err
    (tmp_path / "candidates.jsonl").unlink()
    (tmp_path / "images.jsonl").write_text('{"prompt": "1"}\n{"prompt": 2, "image": "img/0.png"}\nnot json\n')
    assert main(["label", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "line 1: missing key(s) image" in err and "line 2: 'prompt' must be a string" in err and "line 3" in err
    (tmp_path / "images.jsonl").write_text('{"prompt": "1", "image": "img/0.png"}\n')
    (tmp_path / "answers.json").write_text('[{"id": "img/7.png", "answer": "skip"}]')
    assert main(["label", str(tmp_path)]) == 2
    assert "answers.json does not fit this set" in capsys.readouterr().err
    with _busy_port() as port:
        (tmp_path / "answers.json").unlink()
        assert main(["label", str(tmp_path), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_the_command_serves_until_interrupted(tmp_path):
    kto_set(tmp_path, n=2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "diffalign.cli", "label", str(tmp_path),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = re.search(r"open (http://127\.0\.0\.1:\d+/) in a browser", lines[1]).group(1)
        with urllib.request.urlopen(url + "api/state", timeout=10) as r:
            assert json.load(r)["total"] == 2
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)  # generous: CI machines can be loaded
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler prints every thread's stack
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            raise AssertionError(f"label did not stop on SIGINT; its stacks:\n{err[-4000:]}") from None
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped: 0 / 2 answered" in out, (lines, out, err)
    assert lines[0].startswith(f"kto set in {tmp_path}: 0 / 2 answered; writes labels.jsonl")


@contextlib.contextmanager
def _busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_data_writes_unlabelled_sets_that_the_page_opens(tmp_path, capsys):
    out = tmp_path / "cand"
    assert main(["data", "candidates", "--model", "digits", "--n", "2", "--per-prompt", "3", "--steps", "2",
                 "--prompts", "3,7", "--out", str(out)]) == 0
    assert f"diffalign label {out}" in capsys.readouterr().out
    s = open_set(out)
    assert s.kind == "candidates" and [it["prompt"] for it in s.items] == ["3", "7"]
    assert all(len(it["images"]) == 3 for it in s.items)
    assert main(["data", "images", "--model", "digits", "--n", "3", "--steps", "2", "--out", str(tmp_path / "kto")]) == 0
    s = open_set(tmp_path / "kto")
    assert s.kind == "kto" and len(s.items) == 3
    from PIL import Image

    assert Image.open(Path(s.folder) / s.items[0]["images"][0]).size == (8, 8)  # the page scales it up
    assert main(["data", "images", "--model", "toy2d", "--n", "2", "--out", str(tmp_path / "pts")]) == 2
    assert "not images" in capsys.readouterr().err
