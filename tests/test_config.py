import pytest

from diffalign.config import ConfigError, dump_config, load_config
from diffalign.train import resolve_config


def test_defaults_and_yaml_scientific_notation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: ddpo\noptim:\n  lr: 1e-4\ntrain:\n  epochs: 3\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 1e-4 and cfg.train.epochs == 3 and cfg.sampling.eta == 1.0


def test_unknown_key_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'; did you mean 'epochs'"):
        load_config(base={"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'rewrad'; did you mean 'reward'"):
        load_config(base={"rewrad": "ink"})


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="'train.epochs' must be an integer"):
        load_config(base={"train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match="'sampling.logprob'"):
        load_config(base={"sampling": {"logprob": "median"}})
    with pytest.raises(ConfigError, match="'lora.enabled' must be true or false"):
        load_config(base={"lora": {"enabled": "yes"}})


def test_set_overrides_and_round_trip(tmp_path):
    cfg = load_config(base={}, overrides=["train.epochs=7", "sampling.guidance_scale=3", "prompts=['1','2']"])
    assert cfg.train.epochs == 7 and cfg.sampling.guidance_scale == 3.0 and cfg.prompts == ["1", "2"]
    p = tmp_path / "r.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    with pytest.raises(ConfigError, match="key=value"):
        load_config(base={}, overrides=["train.epochs"])


def test_method_args_validated_and_method_defaults_applied():
    cfg, args = resolve_config(base={"method": "ddpo", "args": {"clip_range": 0.2}})
    assert args.clip_range == 0.2
    assert cfg.sampling.logprob == "mean"  # DDPO's preferred scale, applied under the user's config
    cfg, _ = resolve_config(base={"method": "ddpo", "sampling": {"logprob": "sum"}})
    assert cfg.sampling.logprob == "sum"  # ... but the user's choice wins
    with pytest.raises(ConfigError, match="unknown config key 'args.clip'"):
        resolve_config(base={"method": "ddpo", "args": {"clip": 0.2}})


def test_unknown_method_and_eta_zero():
    with pytest.raises(ValueError, match="unknown method 'dpoo'.*registered methods are .*ddpo"):
        resolve_config(base={"method": "dpoo"})
    with pytest.raises(ConfigError, match="eta > 0"):
        resolve_config(base={"method": "ddpo", "sampling": {"eta": 0.0}})


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        resolve_config(c)


def test_rewards_left_at_default_are_the_models_own():
    """The shared config names no model's reward: 'default' becomes what the model registered."""
    cfg = load_config(base={})
    assert (cfg.model, cfg.reward, cfg.eval.reward) == ("digits", "classifier", "classifier_heldout")
    cfg = load_config(base={"model": "toy2d-flow"})
    assert cfg.reward == "quadratic" and cfg.eval.reward is None  # no held-out network for points
    cfg = load_config(base={"model": "toy2d", "reward": "ink", "eval": {"reward": "classifier"}})
    assert cfg.reward == "ink" and cfg.eval.reward == "classifier"  # a named reward stays
    assert "default" not in dump_config(load_config(base={"model": "digits-flow"}))
    with pytest.raises(ConfigError, match="config key 'reward' must be set: model './sd' has no default reward"):
        load_config(base={"model": "./sd"})
    assert load_config(base={"model": "./sd", "reward": "ink"}).eval.reward is None
    with pytest.raises(ValueError, match="unknown model 'toy2'.*Did you mean 'toy2d'"):
        load_config(base={"model": "toy2"})
