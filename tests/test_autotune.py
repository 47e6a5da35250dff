"""Precision and memory format chosen by timing, cached per machine and model; results work either way."""
import pytest
import torch

import diffusion.autotune as autotune
from diffusion.autotune import candidates, choose_precision, cpu_features
from diffusion.checkpoint import load_checkpoint
from diffusion.config import ModelConfig, RuntimeConfig
from diffusion.model import build_model
from diffusion.runtime import Precision
from tests.conftest import TINY, run_cli

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def test_candidates_follow_the_flags_and_the_device(monkeypatch):
    R = RuntimeConfig
    for native, count in ((True, 4), (None, 4), (False, 2)):  # bf16 is timed unless the CPU surely emulates it
        monkeypatch.setattr(autotune, "native_bf16", lambda: native)
        assert len(candidates(R(), CPU)) == count
    assert not any(p.bf16 for p in candidates(R(), CPU))
    assert candidates(R(amp="bf16"), CPU)[0].bf16, "asked for, bf16 runs even where it is emulated"
    monkeypatch.setattr(autotune, "native_bf16", lambda: True)
    assert candidates(R(amp="none", memory_format="contiguous"), CPU) == [Precision(False, False)]
    assert {p.channels_last for p in candidates(R(amp="bf16"), CPU)} == {True, False}
    assert len(candidates(R(), torch.device("cuda"))) == 4  # timed on a GPU too: fp32 can win there
    assert candidates(R(amp="bf16", memory_format="channels_last"), torch.device("cuda")) == [Precision(True, True)]
    assert candidates(R(), torch.device("mps")) == [Precision(False, False)]


def test_the_fastest_is_chosen_said_and_cached(cache, monkeypatch, capsys):
    speed = {Precision(False, True): 0.30, Precision(False, False): 0.35, Precision(True, True): 0.25,
             Precision(True, False): 0.18}
    monkeypatch.setattr(autotune, "time_candidates", lambda model, cfg, device, options, purpose, batch: speed)
    monkeypatch.setattr(autotune, "native_bf16", lambda: True)  # so --amp auto and --amp none ask different questions
    cfg, model_cfg = RuntimeConfig(), ModelConfig()
    model = build_model(model_cfg)
    assert choose_precision(cfg, model_cfg, CPU, model, "train", 64) == Precision(True, False)
    line = capsys.readouterr().err  # stdout is for what the command reports (evaluate --json)
    assert "bf16 + NCHW, the fastest here" in line and "fp32 + channels_last 0.300" in line and str(cache) in line
    assert cache.exists()

    def no_measuring(*args):
        raise AssertionError("a cached choice must not be measured again")
    monkeypatch.setattr(autotune, "time_candidates", no_measuring)
    assert choose_precision(cfg, model_cfg, CPU, model, "train", 64) == Precision(True, False)
    with pytest.raises(AssertionError):  # another model, purpose or batch is another question
        choose_precision(cfg, model_cfg.replace(base_channels=16), CPU, model, "train", 64)
    with pytest.raises(AssertionError):
        choose_precision(cfg, model_cfg, CPU, model, "sample", 64)
    with pytest.raises(AssertionError):  # --amp none asks among fp32 layouts only: the bf16 winner is no answer
        choose_precision(RuntimeConfig(amp="none"), model_cfg, CPU, model, "train", 64)
    monkeypatch.setattr(autotune, "cpu_features", lambda: "AVX512 amx_bf16")  # same name, other instructions
    with pytest.raises(AssertionError):
        choose_precision(cfg, model_cfg, CPU, model, "train", 64)


def test_a_clearly_slower_candidate_is_dropped_after_its_first_call(monkeypatch):
    """Emulated bf16 costs an order of magnitude more per step: one call tells, the other rounds would waste
    minutes of a laptop's start-up."""
    cost = {Precision(False, True): 1.0, Precision(False, False): 1.1, Precision(True, True): 12.0,
            Precision(True, False): 13.0}
    now, calls = [0.0], dict.fromkeys(cost, 0)

    def make_step(model, cfg, device, precision, purpose, batch):
        def step():
            calls[precision] += 1
            now[0] += cost[precision]
        return step

    monkeypatch.setattr(autotune, "make_step", make_step)
    monkeypatch.setattr(autotune, "clock", lambda: now[0])
    seconds = autotune.time_candidates(None, ModelConfig(), CPU, list(cost), "train", 64)
    assert calls == {Precision(False, True): 5, Precision(False, False): 5, Precision(True, True): 1,
                     Precision(True, False): 1}
    assert seconds[Precision(False, True)] == pytest.approx(1.0) and seconds[Precision(True, True)] == pytest.approx(12.0)
    assert min(seconds, key=seconds.get) == Precision(False, True)


def test_native_bf16_is_read_from_the_cpus_flags(monkeypatch):
    monkeypatch.setattr(autotune.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(autotune, "cpu_flags", lambda: {"avx2", "fma"})
    assert autotune.native_bf16() is False
    monkeypatch.setattr(autotune, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert autotune.native_bf16() is True
    monkeypatch.setattr(autotune, "cpu_flags", lambda: None)  # macOS, Windows: unknown, so bf16 is timed
    assert autotune.native_bf16() is None


def test_an_isa_limit_below_bf16_counts_as_a_cpu_without_it(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon runs bf16 emulated, as on an AVX2 laptop: the same answer and the
    same cache key as there, so the simulation times what the laptop would."""
    monkeypatch.setattr(autotune.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(autotune, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert autotune.native_bf16() is True and "amx_bf16" in cpu_features()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert autotune.native_bf16() is False and "bf16" not in cpu_features()
    assert not any(p.bf16 for p in candidates(RuntimeConfig(), CPU))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # a limit that keeps bf16
    assert autotune.native_bf16() is True


def test_the_cache_key_names_the_vector_instructions_torch_uses():
    key = autotune.cache_key(ModelConfig(), CPU, "train", 64, candidates(RuntimeConfig(), CPU))
    assert f"[{cpu_features()}]" in key and torch.backends.cpu.get_cpu_capability() in cpu_features()


def test_an_unwritable_cache_still_gives_an_answer(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("DIFFUSION_CACHE_DIR", str(blocker / "sub"))
    small = ModelConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,))
    got = choose_precision(RuntimeConfig(), small, CPU, build_model(small), "sample", 4, verbose=False)
    assert got in candidates(RuntimeConfig(), CPU)


def test_real_timing_of_each_candidate_runs(cache):
    cfg = ModelConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,))
    model = build_model(cfg)
    before = [p.clone() for p in model.parameters()]
    for purpose in ("train", "sample"):
        options = candidates(RuntimeConfig(), CPU)
        seconds = autotune.time_candidates(model, cfg, CPU, options, purpose, 4)
        assert set(seconds) == set(options) and all(0 < s < 10 for s in seconds.values())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "timing must not touch the model"


def test_checkpoints_and_resume_work_whatever_was_picked(data_root, tmp_path):
    common = [*TINY, "--data-root", str(data_root), "--ckpt-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")]
    first = run_cli("diffusion.main", *common, "--epochs", "1", "--amp", "bf16", "--memory-format", "contiguous")
    assert first.returncode == 0, first.stderr
    second = run_cli("diffusion.main", *common, "--epochs", "2", "--amp", "none", "--memory-format", "channels_last",
                     "--resume")
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr
    state = load_checkpoint(tmp_path / "epoch_002.pth")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    for amp in ("bf16", "none"):
        res = run_cli("diffusion.sampling", "--ckpt-dir", str(tmp_path), "--num-images", "4", "--amp", amp,
                      "--output", str(tmp_path / f"{amp}.png"))
        assert res.returncode == 0, res.stderr
