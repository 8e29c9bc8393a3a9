"""Config system: targets, parameter validation, overrides, presets, resolved dumps."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ldm.config import (
    ConfigError,
    dump,
    instantiate,
    load_config,
    resolve_config_path,
    save_resolved_config,
)
from ldm.registry import Registry, RegistryError


def test_dotted_target_and_params():
    obj = instantiate({"target": "collections.OrderedDict", "params": {}})
    assert type(obj).__name__ == "OrderedDict"
    lin = instantiate(
        {"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}}
    )
    assert tuple(lin.weight.shape) == (3, 2)


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        instantiate({"target": "torch.nn.Linear", "params": {"in_feature": 2, "out_features": 3}})
    msg = str(err.value)
    assert "in_feature" in msg and "in_features" in msg and "valid parameters" in msg


def test_missing_parameter_is_named():
    with pytest.raises(ConfigError, match="missing required parameter.*in_features"):
        instantiate({"target": "torch.nn.Linear", "params": {"out_features": 3}})


def test_unknown_key_next_to_target():
    with pytest.raises(ConfigError, match="parmas"):
        instantiate({"target": "torch.nn.Linear", "parmas": {}})


def test_unknown_short_name_lists_registered_names():
    reg = Registry("test")

    @reg.register("alpha_model")
    class Alpha:
        pass

    assert reg.lookup("alpha_model") is Alpha
    with pytest.raises(RegistryError) as err:
        reg.lookup("alpha_modle")
    msg = str(err.value)
    assert "alpha_modle" in msg and "alpha_model" in msg and "Did you mean" in msg


def test_registering_two_objects_under_one_name_fails():
    reg = Registry("test")
    reg.register("x")(type("A", (), {}))
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("x")(type("B", (), {}))


def test_registry_values_by_priority_then_registration_order():
    reg = Registry("test")
    reg._plugins_loaded = True  # only what this test registers
    for name, prio in (("general", 0), ("other", 0), ("specific", 1)):
        reg.register(name, priority=prio)(type(name, (), {}))
    assert [o.__name__ for o in reg.values()] == ["specific", "general", "other"]


def test_preset_guessers_are_a_registry():
    from ldm.checkpoint import PRESET_GUESSERS

    assert isinstance(PRESET_GUESSERS, Registry)
    assert {"autoencoder", "unet", "fa_vae"} <= set(PRESET_GUESSERS.names())
    assert PRESET_GUESSERS.values()[0].__module__ == "fa_vae.released"  # the most specific first


def test_bad_dotted_path():
    # a ConfigError (what every CLI reports as one line), not the registry's KeyError
    with pytest.raises(ConfigError, match="no attribute"):
        instantiate({"target": "torch.nn.NoSuchLayer"})
    with pytest.raises(ConfigError, match="Did you mean 'vq_model'"):
        instantiate({"target": "vq_modle"})


def test_merge_overrides_and_resolved_dump(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_steps: 100\n  lr: 1.0e-4\nname: run\nfull: ${name}_x\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  max_steps: 50\n")
    cfg = load_config(base, extra, overrides=["trainer.lr=0.5", "name=exp"])
    assert cfg.trainer.max_steps == 50
    assert cfg.trainer.lr == 0.5
    assert cfg.full == "exp_x"
    out = save_resolved_config(cfg, tmp_path / "run")
    assert OmegaConf.load(out).full == "exp_x"
    assert "exp_x" in dump(cfg)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["trainer.lr"])
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path(tmp_path / "nope.yaml")


def test_broken_yaml_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)


def test_preset_resolver_composes(tmp_path):
    part = tmp_path / "part.yaml"
    part.write_text("target: torch.nn.Linear\nparams: {in_features: 4, out_features: 2}\n")
    top = tmp_path / "top.yaml"
    top.write_text(f"model: ${{preset:{part}}}\n")
    cfg = load_config(top)
    assert instantiate(cfg.model).in_features == 4
