"""python -m diffusion.export: a folder with safetensors and config.json that the commands load like a checkpoint."""
import json

import torch

from diffusion.checkpoint import load_checkpoint
from tests.conftest import png_pixels, run_cli, run_inprocess


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
    images = []
    for source in (tiny_checkpoint, folder):
        out = tmp_path / f"{source.name}.png"
        res = run_cli("diffusion.sampling", "--checkpoint", str(source), "--digit", "1", "--output", str(out))
        assert res.returncode == 0, res.stderr
        images.append(png_pixels(out))
    assert torch.equal(*images)


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
