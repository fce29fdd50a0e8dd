"""Config loading, overrides and the errors users see."""

import pytest

from sigmavae_jax.config import CONFIG_DIR, ConfigError, describe_keys, load_config


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    assert load_config(name).model.ch > 0


def test_reference_configs_have_the_design_values():
    flux, sdxl, nextstep = load_config("flux").model, load_config("sdxl").model, load_config("nextstep1_f8c16").model
    assert (flux.z_channels, flux.use_quant_conv, flux.scaling_factor, flux.shift_factor) == (16, False, 0.3611, 0.1159)
    assert (sdxl.z_channels, sdxl.use_quant_conv, sdxl.scaling_factor) == (4, True, 0.13025)
    assert (nextstep.posterior, nextstep.latent_norm, nextstep.noise.distribution) == (
        "deterministic",
        "patch_layernorm",
        "uniform",
    )
    assert flux.downsample_factor == 8 and nextstep.spatial_multiple == 16


def test_overrides_are_typed():
    cfg = load_config("tiny", ["model.z_channels=8", "model.ch_mult=[1,2]", "model.noise.strength=0.3"])
    assert cfg.model.z_channels == 8 and cfg.model.ch_mult == (1, 2) and cfg.model.noise.strength == 0.3


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.z_chanels=8", "model.z_chanels: unknown key"),
        ("model.z_channels=-1", "model.z_channels"),
        ("model.posterior=laplace", "model.posterior"),
        ("model.norm_groups=7", "norm_groups=7 must divide"),
        ("model.scaling_factor=0", "non-zero"),
        ("model.noise.distribution=cauchy", "model.noise.distribution"),
        ("model", "not of the form"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_checks_across_sections_name_the_keys_and_not_the_whole_config():
    with pytest.raises(ConfigError) as raised:
        load_config("nextstep1_f8c16", ["train.image_size=250"])
    # 8x downsampling times the 2x2 latent-norm patch
    assert "train.image_size=250 must be a multiple of 16" in str(raised.value)
    assert "use train.image_size=240 or train.image_size=256" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["data.source=folder", "data.path=photos", "data.resize=16"])
    assert "data.resize=16 is smaller than train.image_size=64" in str(raised.value)
    assert "'model'" not in str(raised.value) and len(str(raised.value).splitlines()) == 2
    assert load_config("tiny", ["train.image_size=36"]).train.image_size == 36


def test_messages_name_the_value_once_without_pydantic_prefixes():
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["model.ch_mult=[]"])
    assert str(raised.value).splitlines()[1] == "  model.ch_mult: must be a non-empty list of positive ints, got []"


@pytest.mark.parametrize(
    "override, line",
    [
        ("train.batchsize=4", "train.batchsize: unknown key (value 4); did you mean train.batch_size?"),
        # a key given in the wrong section, as a value or as a section of its own
        ("train.lr=0.1", "train.lr: unknown key (value 0.1); did you mean optim.lr?"),
        (
            "train.checkpoint.every=2",
            "train.checkpoint: unknown key (value {'every': 2}); did you mean checkpoint.every?",
        ),
        ("every=2", "every: unknown key (value 2); did you mean checkpoint.every or log.every?"),
        (
            "train.foo=1",
            "train.foo: unknown key (value 1); check the spelling (`python train.py --help` lists every key)",
        ),
    ],
)
def test_unknown_keys_suggest_the_known_ones_they_were_meant_as(override, line):
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", [override])
    assert str(raised.value).splitlines()[1:] == [f"  {line}"]


def test_a_setting_of_several_kinds_gets_one_message_and_one_help_line():
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["train.remat=maybe"])
    assert str(raised.value).splitlines()[1:] == [
        "  train.remat: must be true, false, convs, blocks or nested, got 'maybe'"
    ]
    for setting, parsed in [("true", True), ("false", False), ("blocks", "blocks")]:
        assert load_config("tiny", [f"train.remat={setting}"]).train.remat == parsed
    assert "train.remat: bool | convs | blocks | nested = False" in describe_keys()
    assert "data.resize: int | None = None" in describe_keys()


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="nextstep1_f8c16"):
        load_config("no_such_config")
