"""python -m diffusion.export: a folder with safetensors and config.json that the commands load like a checkpoint."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from diffusion.checkpoint import load_checkpoint
from tests.conftest import assert_clean_error, png_pixels, run_cli, run_inprocess


def sevens_of(source: Path, tmp_path: Path) -> torch.Tensor:
    """The pixels `python -m diffusion.sampling --checkpoint source --digit 7` draws."""
    out = tmp_path / f"{source.name}.png"
    res = run_cli("diffusion.sampling", "--checkpoint", str(source), "--digit", "7", "--output", str(out))
    assert res.returncode == 0, res.stderr
    return png_pixels(out)


def test_exported_folder_samples_the_same_images_as_its_checkpoint(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "shared-model"
    res = run_inprocess(capsys, "diffusion.export", str(folder), "--checkpoint", str(tiny_checkpoint))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert not (folder / "model.safetensors").read_bytes().startswith(b"PK"), "not a torch.save zip: no pickle"
    from safetensors.torch import load_file

    state = load_checkpoint(tiny_checkpoint)
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == state["ema"].keys()
    assert all(torch.equal(weights[k], state["ema"][k]) for k in weights), "the EMA weights, exactly"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_config"] == json.loads(json.dumps(state["model_config"])) and config["step"] == state["step"]
    assert set(config) == {"format", "epoch", "step", "model_config"}, "no paths or local settings"
    assert torch.equal(sevens_of(tiny_checkpoint, tmp_path), sevens_of(folder, tmp_path))


def test_exported_folders_refuse_raw_weights_and_damage_in_one_line(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "m"
    assert run_inprocess(capsys, "diffusion.export", str(folder), "--checkpoint", str(tiny_checkpoint)).returncode == 0
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(folder), "--no-ema")
    assert res.returncode == 2 and "only the EMA weights" in res.stderr
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(folder), "--output", str(tmp_path / "x.png"))
    assert res.returncode == 2 and "not a readable safetensors file" in res.stderr
    (folder / "model.safetensors").unlink()
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(folder), "--output", str(tmp_path / "x.png"))
    assert res.returncode == 2 and "no model.safetensors" in res.stderr


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported") / "model"
    res = run_cli("diffusion.export", str(folder), "--checkpoint", str(tiny_checkpoint))
    assert res.returncode == 0, res.stderr
    return folder


def set_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_config"].update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def set_weight(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = next(k for k, v in weights.items() if v.dim() == 4)  # a convolution's kernel
    weights[name] = change(weights[name])
    save_file(weights, folder / "model.safetensors")


FOLDERS = {  # what is wrong in a folder someone sent -> what the one line says
    "a huge network": (lambda f: set_config(f, base_channels=10**6), "--base-channels in"),
    "a billion timesteps": (lambda f: set_config(f, timesteps=10**9), "--timesteps in"),
    "a billion classes": (lambda f: set_config(f, num_classes=10**9), "--num-classes in"),
    "100,000 blocks": (lambda f: set_config(f, num_res_blocks=10**5), "--num-res-blocks in"),
    "parameters past the cap": (lambda f: set_config(f, patch_size=1, base_channels=1024, channel_mults=[1, 2, 4]),
                                "parameters"),
    "a number as text": (lambda f: set_config(f, base_channels="32"), "must be an integer, got '32'"),
    "a float for an integer": (lambda f: set_config(f, timesteps=1000.5), "must be an integer, got 1000.5"),
    "null": (lambda f: set_config(f, image_size=None), "must be an integer, got None"),
    "a number for a list": (lambda f: set_config(f, channel_mults=7), "takes a list of numbers"),
    "NaN weights": (lambda f: set_weight(f, lambda w: w.fill_(float("nan"))), "NaN or infinite"),
    "floats relabelled as integers": (lambda f: set_weight(f, lambda w: w.view(torch.int32)), "is torch.int32"),
    "a wrong shape": (lambda f: set_weight(f, lambda w: w[:1]), "has shape"),
    "no config.json": (lambda f: (f / "config.json").unlink(), "has no config.json"),
    "an empty folder": (lambda f: [p.unlink() for p in f.iterdir()], "has no config.json and no model.safetensors"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{'base_channels': 32"), "not valid JSON"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    "config.json enormous": (lambda f: (f / "config.json").write_bytes(b" " * 200_000 + b"{}"), "larger than"),
}


@pytest.mark.parametrize("case", FOLDERS)
def test_an_exported_folder_is_checked_before_anything_is_built(exported, tmp_path, capsys, case):
    damage, needle = FOLDERS[case]
    folder = tmp_path / "sent"
    shutil.copytree(exported, folder)
    damage(folder)
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(folder), "--output", str(tmp_path / "x.png"))
    assert_clean_error(res, needle)
    assert not (tmp_path / "x.png").exists()


def test_the_weights_file_inside_the_folder_names_the_folder(exported, tmp_path, capsys):
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(exported / "model.safetensors"),
                        "--output", str(tmp_path / "x.png"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "x.png").exists()


def test_an_export_that_fails_halfway_leaves_the_earlier_export_whole(exported, tiny_checkpoint, tmp_path,
                                                                      monkeypatch):
    """The new folder is written beside the old one and swapped in: a failure (or a kill) while writing
    config.json after the weights never leaves new weights under an old config."""
    import diffusion.checkpoint as checkpoint
    from diffusion.errors import UserError

    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    state = load_checkpoint(tiny_checkpoint)
    state["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["ema"].items()}
    newer = tmp_path / "epoch_002.pth"
    checkpoint.save_checkpoint(state, newer)
    real_write = checkpoint._atomic_write

    def fail_on_config(path, write):
        if path.name == "config.json":
            raise OSError(28, "No space left on device")
        real_write(path, write)

    monkeypatch.setattr(checkpoint, "_atomic_write", fail_on_config)
    with pytest.raises(UserError, match="earlier export there is unchanged"):
        checkpoint.export(newer, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_002.pth", "latest", "model"], "no half-written folder"
    monkeypatch.setattr(checkpoint, "_atomic_write", real_write)
    checkpoint.export(newer, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} != before


def test_a_v_prediction_model_samples_the_same_from_its_checkpoint_and_its_export(data_root, tmp_path, capsys):
    """What the network outputs is fixed by training: it travels in model_config, so an exported v-prediction model is
    rebuilt with the same read-back to eps and draws the same pixels (read as eps it would draw others)."""
    from tests.conftest import TINY
    res = run_cli("diffusion.main", *TINY, "--epochs", "1", "--sample-every", "0", "--prediction", "v",
                  "--data-root", str(data_root), "--ckpt-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    checkpoint, folder = tmp_path / "ck" / "epoch_001.pth", tmp_path / "v-model"
    assert run_inprocess(capsys, "diffusion.export", str(folder), "--checkpoint", str(checkpoint)).returncode == 0
    assert json.loads((folder / "config.json").read_text())["model_config"]["prediction"] == "v"
    drawn = sevens_of(checkpoint, tmp_path)
    assert torch.equal(drawn, sevens_of(folder, tmp_path))
    meta = json.loads((folder / "config.json").read_text())
    meta["model_config"]["prediction"] = "eps"
    (folder / "config.json").write_text(json.dumps(meta))
    assert not torch.equal(sevens_of(folder, tmp_path), drawn), "the same weights read as eps draw other digits"
