"""Config: typed overrides, validation once at construction, device resolution."""
import pytest
import torch

from diffusion.config import Config, from_dict, parse_args, resolve_device
from diffusion.errors import UserError


def test_overrides_arrive_typed():
    cfg = parse_args(["--epochs", "3", "--batch-size", "256", "--lr", "1e-3", "--data-root", "/x",
                      "--channel-mults", "1", "2", "--no-download", "--schedule", "cosine"])
    assert cfg.epochs == 3 and cfg.batch_size == 256 and cfg.lr == 1e-3 and cfg.data_root == "/x"
    assert cfg.channel_mults == (1, 2) and cfg.download is False and cfg.schedule == "cosine"
    assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, int)


def test_every_field_is_a_flag_that_arrives_with_its_type():
    """Each Config field, set on the command line to a value other than its default, arrives as that value."""
    import dataclasses

    others = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 0.5 + 0.25,
              tuple: lambda v: (*v[:-1], v[-1] * 2), str: lambda v: v}
    choices = {"dataset": "fashion-mnist", "schedule": "cosine", "sampler": "ddim", "amp": "none", "device": "cpu",
               "data_root": "/elsewhere", "ckpt_dir": "ck", "out_dir": "out", "save_every": "7steps", "logger": "tensorboard",
               "memory_format": "contiguous", "guidance_interval": (0.5, 4.0), "guide_checkpoint": "none",
               "image_size": 56, "base_channels": 40, "beta_start": 0.0002}  # values the validation accepts
    for f in dataclasses.fields(Config):
        default = getattr(Config(), f.name)
        value = choices.get(f.name, others[type(default)](default))
        assert value != default, f.name
        if isinstance(value, bool):
            argv = [f"--{'' if value else 'no-'}{f.name.replace('_', '-')}"]
        else:
            argv = [f"--{f.name.replace('_', '-')}", *map(str, value if isinstance(value, tuple) else [value])]
        got = getattr(parse_args(argv), f.name)
        assert got == value and type(got) is type(default), (f.name, got, value)


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(["--epohcs", "3"])
    assert err.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_data_root_from_environment(monkeypatch):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", "/somewhere")
    assert Config().data_root == "/somewhere"


@pytest.mark.parametrize("kwargs,needle", [
    ({"epochs": 0}, "--epochs must be positive"), ({"batch_size": -1}, "--batch-size"),
    ({"timesteps": 0}, "--timesteps"), ({"lr": 0.0}, "--lr"), ({"schedule": "quadratic"}, "--schedule"),
    ({"sampler": "euler"}, "--sampler"), ({"image_size": 30}, "must divide by 4"),
    ({"base_channels": 12}, "multiple of 8"), ({"guidance": -1.0}, "--guidance"), ({"sample_steps": -1}, "--sample-steps"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "--beta-start"), ({"dataset": "cifar"}, "--dataset"),
])
def test_nonsense_is_rejected_when_built(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        Config(**kwargs)


def test_round_trip_through_plain_dict():
    cfg = Config(epochs=7, channel_mults=(1, 2))
    assert from_dict(cfg.to_dict()) == cfg
    assert from_dict({**cfg.to_dict(), "removed_in_a_later_version": 1}) == cfg


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


def test_readmes_carry_the_configuration_table_written_from_the_fields():
    from pathlib import Path

    from diffusion.config import markdown_table

    root = Path(__file__).resolve().parents[1]
    for readme in ("README.md", "README.ko.md"):
        assert markdown_table() in (root / readme).read_text(), f"{readme}: regenerate with diffusion.config.markdown_table()"
