"""Experiment trackers (`train.log_with`, through accelerate's): TensorBoard gets every epoch's scalars at the
reward-query step, the sample grids as images and the config; Weights & Biases in offline mode (no network)
gets the same scalars per epoch, the grids and the config, and a resumed run continues the same W&B run."""

import json
import re
import struct

import pytest

from diffalign.config import ConfigError
from diffalign.train import resolve_config, train

TOY = {"method": "ddpo", "model": "toy2d", "reward": "quadratic", "prompts": [""],
       "train": {"batch_size": 8, "batches_per_epoch": 1, "epochs": 2, "sample_grid_every": 1},
       "eval": {"reward": None, "per_prompt": 16}}


def tb_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [EventAccumulator(str(d), size_guidance={"images": 0, "scalars": 0}).Reload()
            for d in [folder, *folder.rglob("*")] if d.is_dir() and any(p.name.startswith("events.") for p in d.iterdir())]
    return runs


def test_tensorboard_gets_scalars_at_reward_queries_images_and_the_config(tmp_path):
    cfg, args = resolve_config(base=TOY)
    train(cfg, args, tmp_path / "run")
    runs = tb_events(tmp_path / "run" / "tb")
    scalars = {t: [(e.step, e.value) for e in r.Scalars(t)] for r in runs for t in r.Tags()["scalars"]}
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["reward_mean"]] == [m["reward_queries"] for m in metrics] == [8, 16]
    assert [v for _, v in scalars["reward_mean"]] == pytest.approx([m["reward_mean"] for m in metrics])
    images = {t for r in runs for t in r.Tags()["images"]}
    assert {"samples/base", "samples/epoch", "samples/final"} <= images
    assert "final/final_reward_mean" in scalars
    hparams = list((tmp_path / "run" / "tb").rglob("hparams.yml"))
    assert hparams and "method: ddpo" in hparams[0].read_text()


def wandb_records(path):
    """The records of an offline W&B run file: its leveldb-style log (a 7-byte file header, then 32 kB blocks of
    records with 7-byte headers: checksum, length, type full/first/middle/last), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the block's zero padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_gets_the_same_run_and_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, args = resolve_config(base=dict(TOY, train=dict(TOY["train"], log_with="wandb")))
    assert not train(cfg, args, tmp_path / "run", max_epochs=1)["finished"]
    assert train(cfg, args, tmp_path / "run", resume=True)["finished"]
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)", r.name).group(1) for r in runs}  # (-1: same second)
    assert len(runs) == 2 and len(ids) == 1  # one W&B run id, resumed
    records = [rec for r in runs for rec in wandb_records(next(r.glob("*.wandb")))]
    config = {u.key: json.loads(u.value_json) for rec in records if rec.WhichOneof("record_type") == "config"
              for u in rec.config.update}
    assert config["method"] == "ddpo" and config["train.log_with"] == "wandb" and config["sampling.num_steps"] == 20
    rows = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for rec in records if rec.WhichOneof("record_type") == "history"]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {row["epoch"]: row for row in rows if "epoch" in row and "loss" in row}
    assert sorted(logged) == [0, 1]  # each epoch once, at its epoch, across the stop and the resume
    for m in metrics:
        assert logged[m["epoch"]]["_step"] == m["epoch"] and logged[m["epoch"]]["reward_queries"] == m["reward_queries"]
        assert logged[m["epoch"]]["loss"] == pytest.approx(m["loss"])
    images = {p.name.split("_")[0] for r in runs for p in (r / "files" / "media" / "images" / "samples").iterdir()}
    assert images == {"base", "epoch", "final"}
    assert any("final/final_reward_mean" in row for row in rows)


def test_an_unknown_or_missing_tracker_is_a_config_error():
    import importlib.util

    with pytest.raises(ConfigError, match="train.log_with.*must be one of tensorboard, wandb, trackio, mlflow"):
        resolve_config(base=dict(TOY, train=dict(TOY["train"], log_with="neptune")))
    if importlib.util.find_spec("mlflow") is None:  # not installed here: the error says how to get it
        with pytest.raises(ConfigError, match="pip install mlflow"):
            resolve_config(base=dict(TOY, train=dict(TOY["train"], log_with="mlflow")))
