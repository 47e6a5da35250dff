"""Config by owner: typed flags, one validator for flags, files and requests, device resolution."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from diffusion.config import (PARTS, DataConfig, ModelConfig, RuntimeConfig, SampleConfig, TrainConfig, as_flags, build,
                              configuration_page, fields_of, markdown_table)
from diffusion.errors import UserError
from diffusion.main import parse_run
from diffusion.runtime import resolve_device


def test_overrides_arrive_typed_in_their_owners_part():
    _, cfg = parse_run(["--epochs", "3", "--batch-size", "256", "--lr", "1e-3", "--data-root", "/x",
                        "--channel-mults", "1", "2", "--no-download", "--schedule", "cosine", "--steps", "7"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 256 and cfg.train.lr == 1e-3 and cfg.data.data_root == "/x"
    assert cfg.model.channel_mults == (1, 2) and cfg.data.download is False and cfg.model.schedule == "cosine"
    assert cfg.sample.sample_steps == 7 and isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, int)
    assert cfg.sample.guidance is None and cfg.sample.eta is None  # not asked for: the recipe decides


def test_every_field_is_a_flag_that_arrives_with_its_type():
    """Each field of every part, set on the command line to a value other than its default, arrives as that value."""
    others = {bool: lambda v: not v, int: lambda v: (v or 0) + 1, float: lambda v: (v or 0) * 0.5 + 0.25,
              tuple: lambda v: (*v[:-1], v[-1] * 2), str: lambda v: v}
    choices = {"dataset": "fashion-mnist", "schedule": "linear", "sampler": "ddim", "amp": "none", "device": "cpu",
               "data_root": "/elsewhere", "ckpt_dir": "ck", "out_dir": "out", "save_every": "7steps",
               "logger": "tensorboard", "memory_format": "contiguous", "guidance_interval": (0.5, 4.0),
               "guide_checkpoint": "none", "image_size": 56, "base_channels": 40, "beta_start": 0.0002,
               "ema_decay": 0.99, "channels": 3, "patch_size": 1, "noise_levels": "lognormal", "prediction": "v",
               "ema_lengths": (0.05, 0.1), "attention_heads": 2}  # values the validation accepts
    for part, f in fields_of(*PARTS):
        default = getattr(part(), f.name)
        value = choices[f.name] if f.name in choices else others[f.metadata["kind"]](default)
        assert value != default, f.name
        if isinstance(value, bool):
            argv = [f"--{'' if value else 'no-'}{f.name.replace('_', '-')}"]
        else:
            argv = [f"--{f.name.replace('_', '-')}", *map(str, value if isinstance(value, tuple) else [value])]
        if f.name.startswith("beta_"):  # the betas shape only the linear schedule
            argv += ["--schedule", "linear"]
        _, cfg = parse_run(argv)
        got = getattr(getattr(cfg, {ModelConfig: "model", DataConfig: "data", TrainConfig: "train",
                                    SampleConfig: "sample", RuntimeConfig: "runtime"}[part]), f.name)
        assert got == value and type(got) is f.metadata["kind"], (f.name, got, value)


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        parse_run(["--epohcs", "3"])
    assert err.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_data_root_from_environment(monkeypatch):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", "/somewhere")
    assert DataConfig().data_root == "/somewhere"


@pytest.mark.parametrize("part,kwargs,needle", [
    (TrainConfig, {"epochs": 0}, "--epochs must be >= 1"), (TrainConfig, {"batch_size": -1}, "--batch-size"),
    (ModelConfig, {"timesteps": 0}, "--timesteps"), (TrainConfig, {"lr": 0.0}, "--lr must be > 0"),
    (ModelConfig, {"schedule": "quadratic"}, "--schedule"), (SampleConfig, {"sampler": "euler"}, "--sampler"),
    (ModelConfig, {"image_size": 30}, "must divide by 4"), (ModelConfig, {"base_channels": 12}, "multiple of 8"),
    (SampleConfig, {"guidance": -1.0}, "--guidance"), (SampleConfig, {"sample_steps": 0}, "--sample-steps"),
    (ModelConfig, {"beta_start": 0.1, "beta_end": 0.01}, "--beta-start"), (DataConfig, {"dataset": "cifar"}, "--dataset"),
    (SampleConfig, {"guidance": math.nan}, "finite"), (SampleConfig, {"eta": math.inf}, "finite"),
    (SampleConfig, {"guidance": math.inf}, "finite"), (RuntimeConfig, {"seed": 2**64}, "--seed must be"),
    (ModelConfig, {"timesteps": 10**9}, "--timesteps must be"), (ModelConfig, {"num_classes": 10**9}, "--num-classes"),
    (ModelConfig, {"attention_heads": 3}, "32 channels do not split into 3 heads"),
    (ModelConfig, {"base_channels": 24, "channel_mults": (1, 2), "attention_resolutions": (14,), "attention_heads": 16},
     "24 channels"),
    (SampleConfig, {"guidance_interval": (2.0, 1.0)}, "LO < HI"), (SampleConfig, {"guidance_interval": (math.nan, 1.0)}, "finite"),
])
def test_nonsense_is_rejected_when_built(part, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        part(**kwargs)


@pytest.mark.parametrize("values,needle", [
    ({"base_channels": "32"}, "must be an integer"), ({"timesteps": 1000.0}, "must be an integer"),
    ({"num_classes": None}, "must be an integer"), ({"channel_mults": 7}, "list of numbers"),
    ({"num_res_blocks": True}, "must be an integer"), ({"schedule": 3}, "must be str"),
    ({"hidden_size": 3}, "unknown setting"), ({"channel_mults": [1, "2"]}, "must be an integer"),
    ({"channel_mults": []}, "list of numbers"),
])
def test_a_config_file_is_checked_field_by_field_with_the_flag_rules(values, needle):
    with pytest.raises(UserError, match=needle) as err:
        build(ModelConfig, values, "DIR/config.json")
    assert "DIR/config.json" in str(err.value)


@pytest.mark.parametrize("attention", [(7,), ()])
def test_a_config_file_round_trips_through_json_types(attention):
    cfg = ModelConfig(base_channels=16, channel_mults=(1, 2), attention_resolutions=attention)
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    assert build(ModelConfig, as_json) == cfg


def test_settings_written_as_flags_parse_back_to_themselves():
    values = {"compile": True, "download": False, "attention_resolutions": (), "channel_mults": (1, 2), "lr": 5e-4}
    _, cfg = parse_run(as_flags(values))
    assert (cfg.train.compile, cfg.data.download, cfg.model.attention_resolutions, cfg.model.channel_mults,
            cfg.train.lr) == tuple(values.values())


def test_attention_resolutions_with_no_number_leaves_only_the_middle_blocks_attention(capsys):
    """The one list that may be empty; the others still need a number."""
    assert parse_run(["--attention-resolutions"])[1].model.attention_resolutions == ()
    assert parse_run(["--attention-resolutions", "14", "7"])[1].model.attention_resolutions == (14, 7)
    with pytest.raises(SystemExit):
        parse_run(["--channel-mults"])
    assert "expected at least one argument" in capsys.readouterr().err


def test_device_auto_and_errors():
    expected = "cuda" if torch.cuda.is_available() else None
    assert resolve_device("cpu").type == "cpu"
    if expected:
        assert resolve_device("auto").type == expected
    elif not (torch.backends.mps.is_available()):
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(UserError, match="no GPU"):
            resolve_device("cuda")
    with pytest.raises(UserError):
        resolve_device("tpu9")


def test_the_configuration_page_is_written_from_the_fields():
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert page == configuration_page(), "regenerate docs/configuration.md (the command is on its first lines)"
    assert markdown_table() in page
    assert all(f"`--{f.name.replace('_', '-')}`" in page for _, f in fields_of(*PARTS))


def test_no_part_shares_a_field_name_with_another():
    names = [f.name for part in PARTS for f in dataclasses.fields(part)]
    assert len(names) == len(set(names))
