"""Offline preference methods (Diffusion-DPO, Diffusion-KTO) and their feedback sets."""

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch

from diffalign.data import feedback
from diffalign.losses import denoising_error, dpo_loss, logratio_from_errors
from diffalign.sampler import Sampler



# ---- DPO at initialisation -----------------------------------------------------------
def test_dpo_at_init_is_log2_and_step_favours_winner(tiny):
    torch.manual_seed(0)
    ref = copy.deepcopy(tiny.denoiser).requires_grad_(False)
    pol = tiny.denoiser
    xw, xl = torch.randn(8, 1, 4, 4).clamp(-1, 1), torch.randn(8, 1, 4, 4).clamp(-1, 1)
    cond = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ts = torch.randint(0, 1000, (8,))
    eps = torch.randn(8, 1, 4, 4)
    sch = tiny.scheduler
    xwt, xlt = sch.add_noise(xw, eps, ts), sch.add_noise(xl, eps, ts)

    def errs(net):
        return denoising_error(net(xwt, ts, cond), eps), denoising_error(net(xlt, ts, cond), eps)

    with torch.no_grad():
        rw, rl = errs(ref)
    e_w, e_l = errs(pol)
    per, info = dpo_loss(logratio_from_errors(e_w, rw), logratio_from_errors(e_l, rl), beta=100.0)
    loss = per.mean()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert info["accuracy"].item() == 0.0
    opt = torch.optim.SGD(pol.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    with torch.no_grad():
        e_w2, e_l2 = errs(pol)
        margin = ((e_w2 - e_l2) - (rw - rl)).mean()
    assert margin.item() < 0, "the winner's denoising error must drop relative to the loser's"
    loss2 = dpo_loss(logratio_from_errors(e_w2, rw), logratio_from_errors(e_l2, rl), beta=100.0)[0].mean()
    assert loss2.item() < math.log(2)


# ---- data sets -----------------------------------------------------------------------
def _png(path, value=0.5):
    feedback.save_png(torch.full((1, 8, 8), value), path)


def test_png_roundtrip_and_encode(tiny):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        img = torch.rand(1, 8, 8)
        feedback.save_png(img, Path(d) / "a.png")
        back = feedback.load_png(Path(d) / "a.png")
    assert back.shape == (1, 8, 8)
    assert (back - img).abs().max() <= 0.5 / 255 + 1e-6
    x = tiny.encode_images(back.unsqueeze(0))  # tiny samples (1, 4, 4): resized
    assert x.shape == (1, 1, 4, 4) and x.min() >= -1 and x.max() <= 1
    tiny.image_encoder = lambda imgs: imgs * 0 + 7  # the latent-model hook (a VAE)
    assert tiny.encode_images(back.unsqueeze(0)).eq(7).all()


def test_pairs_validation_reports_every_bad_row_by_line(tmp_path):
    for n in ("a", "b", "c"):
        _png(tmp_path / "img" / f"{n}.png")
    (tmp_path / "img" / "bad.png").write_text("not a png")
    rows = [
        {"prompt": "1", "winner": "img/a.png", "loser": "img/b.png"},
        {"prompt": "2", "winner": "img/a.png", "loser": "img/missing.png"},  # line 2
        {"prompt": "3", "winner": "img/bad.png", "loser": "img/c.png"},  # line 3
        {"prompt": "4", "winner": "img/a.png"},  # line 4
        {"prompt": "5", "winner": "img/a.png", "loser": "img/c.png", "tie": "yes"},  # line 5
    ]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    with pytest.raises(feedback.FeedbackError) as e:
        feedback.load_pairs(p)
    msg = str(e.value)
    for frag in ("line 2: 'loser' file 'img/missing.png' not found", "line 3: 'winner' file 'img/bad.png' is not a readable",
                 "line 4: missing key(s) loser", "line 5: 'tie' must be true or false", "line 6: invalid JSON"):
        assert frag in msg, msg
    assert "  line 1:" not in msg
    # ties are dropped and counted
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(dict(rows[0], tie=True)) + "\n")
    ps = feedback.load_pairs(p)
    assert len(ps) == 1 and ps.ties_dropped == 1 and ps.winners.shape == (1, 1, 8, 8)


def test_labels_validation(tmp_path):
    _png(tmp_path / "a.png")
    rows = [{"prompt": "1", "image": "a.png", "desirable": True},
            {"prompt": "1", "image": "a.png", "desirable": "maybe"},
            {"prompt": "1", "image": "nope.png", "desirable": False}]
    p = tmp_path / "labels.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(feedback.FeedbackError, match=r"line 2: 'desirable' must be true or false") as e:
        feedback.load_labels(p)
    assert "line 3: 'image' file 'nope.png' not found" in str(e.value)


def test_labels_from_pairs_pick_a_pic_rule(tmp_path):
    for n in "abcd":
        _png(tmp_path / "p" / f"{n}.png", value=0.1 * (ord(n) - 96))
    rows = [{"prompt": "1", "winner": "a.png", "loser": "b.png"},
            {"prompt": "1", "winner": "b.png", "loser": "c.png"},  # b preferred once -> desirable
            {"prompt": "2", "winner": "d.png", "loser": "c.png", "tie": True}]  # dropped: d never counted
    (tmp_path / "p" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_rows, counts = feedback.labels_from_pairs(tmp_path / "p" / "pairs.jsonl", tmp_path / "l")
    assert counts == {"desirable": 2, "undesirable": 1, "ties_dropped": 1}
    assert {Path(r["image"]).name: r["desirable"] for r in out_rows} == {"a.png": True, "b.png": True, "c.png": False}
    ls = feedback.load_labels(tmp_path / "l" / "labels.jsonl")  # paths rewritten relative to the new folder
    assert ls.counts == {"desirable": 2, "undesirable": 1}
    mem = feedback.labels_from_pair_set(feedback.load_pairs(tmp_path / "p" / "pairs.jsonl"))
    assert mem.desirable.tolist() == [True, True, False]


def test_bradley_terry_pairs_and_cli_labels(tmp_path, tiny):
    """make_pairs on a tiny model with a reward = mean brightness; BT noise flips some pairs."""
    from diffalign.cli import main

    reward = lambda imgs, prompts: (imgs.flatten(1).mean(1), {})  # noqa: E731
    s = feedback.make_pairs(tiny, reward, ["0", "1"], 16, tmp_path / "exact", seed=0, sampler=Sampler(num_steps=4))
    assert s["pairs"] == 16 and s["agreement_with_reward"] == 1.0
    noisy = feedback.make_pairs(tiny, reward, ["0", "1"], 64, tmp_path / "bt", seed=0, sampler=Sampler(num_steps=4),
                                bt_noise=1e6)
    assert 0.2 < noisy["agreement_with_reward"] < 0.8  # near coin flips at a huge temperature
    assert main(["data", "labels", "--pairs", str(tmp_path / "exact" / "pairs.jsonl"), "--out",
                 str(tmp_path / "lab")]) == 0
    assert feedback.load_labels(tmp_path / "lab" / "labels.jsonl").counts["desirable"] == 16 - s["ties"]


def test_rank_labels_split_each_prompt_at_its_median_or_top_quarter():
    """Worked by hand. Prompt b's rewards all beat prompt a's, so only a per-prompt split gives a
    desirable images; equal rewards rank in list order; an odd prompt's middle sample is not above
    its median."""
    prompts = ["a", "b", "a", "b", "a", "b", "a", "a", "b", "a", "c", "c", "c"]
    rewards = [0.3, 5.0, 0.9, 4.0, 0.5, 6.0, 0.5, 0.1, 4.0, 0.5, 1.0, 2.0, 3.0]
    # a: 2 (0.9), then 4, 6, 9 tied at 0.5 -> 4 and 6 make the top 3 of 6, 9 does not; b: 5, 1 of 4; c: 12 of 3
    median = feedback.rank_labels(rewards, prompts, 0.5)
    assert [i for i, d in enumerate(median) if d] == [1, 2, 4, 5, 6, 12]
    quarter = feedback.rank_labels(rewards, prompts, 0.25)  # a: 1 of 6, b: 1 of 4, c: 0 of 3
    assert [i for i, d in enumerate(quarter) if d] == [2, 5]


def test_make_labels_labels_the_pair_samples_one_by_one(tmp_path, tiny):
    """make_labels spends one reward query per image, on make_pairs's samples at the same seed (an odd
    n leaves the last b sample out), and labels each by its rank within its prompt."""
    calls = []

    def reward(imgs, prompts):
        calls.append(len(imgs))
        return imgs.flatten(1).mean(1), {}

    s = feedback.make_labels(tiny, reward, ["0", "1"], 7, tmp_path / "lab", seed=3, sampler=Sampler(num_steps=4))
    assert sum(calls) == 7 and (s["images"], s["desirable"], s["undesirable"]) == (7, 3, 4)  # prompt 0: 2 of 4; 1: 1 of 3
    assert s["desirable_reward_mean"] > s["undesirable_reward_mean"]
    ls = feedback.load_labels(tmp_path / "lab" / "labels.jsonl")
    assert ls.counts == {"desirable": 3, "undesirable": 4} and ls.prompts == ["0", "0", "1", "1", "0", "0", "1"]
    r = ls.images.flatten(1).mean(1)  # the stored images score as they were labelled
    for prompt in ("0", "1"):
        mine = [i for i, p in enumerate(ls.prompts) if p == prompt]
        assert min(r[i] for i in mine if ls.desirable[i]) >= max(r[i] for i in mine if not ls.desirable[i])
    feedback.make_pairs(tiny, reward, ["0", "1"], 4, tmp_path / "pairs", seed=3, sampler=Sampler(num_steps=4))
    for f in ls.files:  # the same images as the pair set's, under the same names
        assert f.read_bytes() == (tmp_path / "pairs" / "img" / f.name).read_bytes()
    assert not (tmp_path / "lab" / "img" / "000003_b.png").exists()
    with pytest.raises(ValueError, match="desirable_fraction"):
        feedback.make_labels(tiny, reward, ["0"], 4, tmp_path / "x", desirable_fraction=1.0)


def test_pairs_from_labels_match_within_a_prompt_and_drop_the_rest(tmp_path):
    for n in "abcdefgh":
        _png(tmp_path / "lab" / "img" / f"{n}.png", value=0.1 * (ord(n) - 96))
    rows = [("1", "a", True), ("3", "g", False), ("1", "b", False), ("2", "f", True), ("1", "c", False),
            ("1", "d", True), ("3", "h", False), ("1", "e", False)]
    (tmp_path / "lab" / "labels.jsonl").write_text("".join(
        json.dumps({"prompt": p, "image": f"img/{n}.png", "desirable": d}) + "\n" for p, n, d in rows))
    pairs, counts = feedback.pairs_from_labels(tmp_path / "lab" / "labels.jsonl", tmp_path / "dpo")
    # prompt 1: a beats b, d beats c (file order), e left over; 2 has no undesirable, 3 no desirable image
    assert [(r["prompt"], Path(r["winner"]).name, Path(r["loser"]).name) for r in pairs] == [
        ("1", "a.png", "b.png"), ("1", "d.png", "c.png")]
    assert counts == {"pairs": 2, "unmatched_desirable": 1, "unmatched_undesirable": 3}
    ps = feedback.load_pairs(tmp_path / "dpo" / "pairs.jsonl")  # paths point at the labels' image files
    assert ps.winner_paths == ["../lab/img/a.png", "../lab/img/d.png"] and len(list((tmp_path / "dpo").iterdir())) == 1
    assert ps.winners[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.4], abs=1 / 255)
    same, _ = feedback.pairs_from_labels(tmp_path / "lab" / "labels.jsonl")  # no out_dir: relative to the labels
    assert same[0]["winner"] == "img/a.png"
    (tmp_path / "lab" / "labels.jsonl").write_text(json.dumps({"prompt": "1", "image": "img/a.png", "desirable": True}))
    with pytest.raises(feedback.FeedbackError, match="no pairs can be formed"):
        feedback.pairs_from_labels(tmp_path / "lab" / "labels.jsonl")


def test_method_refuses_bad_data_before_training(tmp_path):
    from diffalign.train import resolve_config, train

    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "1", "winner": "x.png", "loser": "y.png"}) + "\n")
    cfg, args = resolve_config("configs/diffusion_dpo_digits.yaml", [f"args.data={tmp_path / 'pairs.jsonl'}"])
    with pytest.raises(feedback.FeedbackError, match="line 1: 'winner' file 'x.png' not found"):
        train(cfg, args, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- end to end on digits ------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_pairs(tmp_path_factory):
    from diffalign.models import load_model
    from diffalign.rewards import build_reward

    out = tmp_path_factory.mktemp("pairs")
    stats = feedback.make_pairs(load_model("digits", progress=False), build_reward("classifier"),
                                [str(d) for d in range(10)], 128, out, seed=123, sampler=Sampler(num_steps=10))
    return out / "pairs.jsonl", stats


E2E = ["train.epochs=12", "eval.per_prompt=10", "sampling.num_steps=10", "optim.lr=3e-3"]


@pytest.mark.parametrize("method", ["diffusion-dpo", "diffusion-kto"])
def test_end_to_end_raises_heldout_reward_and_writes_win_rate(tmp_path, digits_pairs, method):
    from diffalign.train import resolve_config, train

    pairs, stats = digits_pairs
    assert stats["winner_reward_mean"] > stats["loser_reward_mean"]
    cfg_file = f"configs/{method.replace('-', '_')}_digits.yaml"
    cfg, args = resolve_config(cfg_file, [f"args.data={pairs}", *E2E])  # KTO: pairs -> labels in memory
    t0 = time.time()
    s = train(cfg, args, tmp_path / "run")
    wall = time.time() - t0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(method, {k: summary[k] for k in ("base_eval_reward_mean", "final_eval_reward_mean", "win_rate_vs_base",
                                           "eval_win_rate_vs_base")}, f"{wall:.0f}s")
    assert s["reward_queries"] == 0 == summary["reward_queries"]
    assert summary["final_eval_reward_mean"] > summary["base_eval_reward_mean"]
    assert summary["final_reward_mean"] > summary["base_reward_mean"]  # the reward that labelled the pairs, too
    base, aligned = summary["base"]["eval_sample_rewards"], summary["final"]["eval_sample_rewards"]
    assert len(base) == len(aligned) == 100  # same noise, same prompt: sample i against sample i
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(aligned, base))
    assert summary["eval_win_rate_vs_base"] == wins / 100 and wins > 0
    if method == "diffusion-dpo":
        assert summary["win_rate_vs_base"] > 0.5  # on the reward that labelled the pairs, same noise as the base
    # Diffusion-KTO raises both means here (held-out +0.017, training +0.009 on the version-2 base) but wins
    # exactly half of the 100 samples against the base (0.59-0.62 with lr 1e-3 or 24 epochs; 0.71 with the
    # loss-averse utility): more samples improve a little than get worse, not a majority. The README's
    # benchmark reports the same: KTO is the weaker offline method on this model.


def test_offline_error_target_follows_prediction_type():
    """Diffusion-DPO/KTO's denoising error is measured against what the model predicts. A v-model
    that is the exact twin of an ε-model (v = ε/sqrt(a) - sqrt(1-a) x_t/sqrt(a)) has error
    ε-error / a_t per sample: the velocity target, not the noise, is what it is scored against."""
    from types import SimpleNamespace

    from diffalign.methods.offline import errors, noised
    from diffalign.sampling import alpha_bar
    from test_sampler import AsV
    from tiny_models import tiny_model

    eps_model, v_model = tiny_model(), tiny_model(prediction_type="v_prediction")
    v_model.denoiser = AsV(eps_model.denoiser, v_model.scheduler)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 4, 4, generator=g).clamp(-1, 1), torch.randn(4, 1, 4, 4, generator=g)
    t, cond = torch.tensor([20, 300, 600, 900]), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        x_t, target_e = noised(SimpleNamespace(model=eps_model), x0, noise, t)
        x_t_v, target_v = noised(SimpleNamespace(model=v_model), x0, noise, t)
        e_eps, e_v = errors(eps_model, x_t, t, target_e, cond), errors(v_model, x_t_v, t, target_v, cond)
    a = alpha_bar(v_model.scheduler, t, x0).flatten()
    torch.testing.assert_close(x_t, x_t_v)
    torch.testing.assert_close(e_v, e_eps / a, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(errors(v_model, x_t, t, noise, cond), e_eps / a, rtol=1e-2)  # the noise is not its target
