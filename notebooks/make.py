"""Writes walkthrough.ipynb (English) and walkthrough.ko.ipynb (Korean) from one list of cells, so both run the
same code: python notebooks/make.py, then python notebooks/make.py --execute to store their pictures.

Each step is (English text, Korean text, code). The code calls the package itself, never a second
implementation, and its checks are assertions: tests/test_walkthrough.py runs both notebooks.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = {"en": HERE / "walkthrough.ipynb", "ko": HERE / "walkthrough.ko.ipynb"}

STEPS = [
    ("""# DDPM on MNIST, step by step

This notebook runs the project's own code on real digits: the noise schedule, the forward process that turns a
digit into noise, one training step, the reverse process that turns noise back into a digit, and guidance.
Each step names the function and the file behind it, so you can read the code next. It runs top to bottom on
a laptop CPU in a few minutes.

It uses the checkpoint that `python -m diffusion.main` trained, when there is one. Otherwise it trains a small
model for a minute or two first, and its digits will be rough.""",
     """# 단계별로 보는 MNIST DDPM

이 노트북은 이 프로젝트의 코드를 실제 숫자 이미지에 그대로 실행합니다. 노이즈 스케줄, 숫자를 노이즈로 바꾸는
순방향 과정, 학습 한 단계, 노이즈를 다시 숫자로 바꾸는 역방향 과정, 그리고 가이던스를 차례로 봅니다. 단계마다
그 뒤에 있는 함수와 파일 이름을 적어 두었으니, 다음에는 그 코드를 읽어 보면 됩니다. 노트북 CPU에서 위에서부터
끝까지 몇 분 안에 실행됩니다.

`python -m diffusion.main`으로 학습한 체크포인트가 있으면 그것을 씁니다. 없으면 먼저 작은 모델을 1~2분 동안
학습하므로, 숫자가 거칠게 나옵니다.""",
     """import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

from diffusion import diffusion_utils as du
from diffusion.checkpoint import find_latest, load_network
from diffusion.config import DataConfig
from diffusion.dataloader import load_images, to_unit_range

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()  # the repository
DATA = DataConfig(data_root=os.environ.get("DIFFUSION_DATA_ROOT", str(ROOT / "data")))
torch.set_grad_enabled(False)


def show(images, nrow, title=None, scale=1.0):
    \"\"\"A grid of images in [-1, 1], big enough to see.\"\"\"
    grid = make_grid(images.float().clamp(-1, 1).cpu(), nrow=nrow, padding=2, pad_value=1, normalize=True,
                     value_range=(-1, 1))
    plt.figure(figsize=(scale * grid.shape[2] / 40, scale * grid.shape[1] / 40))
    plt.imshow(grid.permute(1, 2, 0))
    plt.axis("off")
    if title:
        plt.title(title)
    plt.show()"""),

    ("""## 1. The noise schedule (`diffusion/diffusion_utils.py`: `make_schedule`)

DDPM adds noise in T = 1000 small steps. Step t adds variance β_t; ᾱ_t = ∏ (1 − β_s) is how much of the
digit's signal survives to step t, and SNR_t = ᾱ_t / (1 − ᾱ_t) compares signal to noise. The paper's schedule
is linear in β (1e-4 to 0.02); the cosine schedule (Nichol & Dhariwal 2021) destroys the digit more slowly,
so fewer steps are spent where the digit is already gone. `python -m diffusion.main` trains with the cosine
schedule, `--schedule linear` (and `--paper`) with the paper's; the cells below use the paper's.

In the code t is **0-indexed**: index 0 is the paper's t = 1 and index T − 1 is the paper's t = T.""",
     """## 1. 노이즈 스케줄 (`diffusion/diffusion_utils.py`: `make_schedule`)

DDPM은 T = 1000번의 작은 단계로 노이즈를 더합니다. 단계 t는 분산 β_t를 더합니다. ᾱ_t = ∏ (1 − β_s)는 숫자의
신호가 단계 t까지 얼마나 남는지이고, SNR_t = ᾱ_t / (1 − ᾱ_t)는 신호와 노이즈의 비입니다. 논문의 스케줄은 β가
선형(1e-4에서 0.02)이고, 코사인 스케줄(Nichol & Dhariwal 2021)은 숫자를 더 천천히 지웁니다. 그래서 숫자가
이미 사라진 단계에 쓰는 학습이 줄어듭니다. `python -m diffusion.main`은 코사인 스케줄로 학습하고,
`--schedule linear`(그리고 `--paper`)는 논문의 스케줄로 학습합니다. 아래 셀은 논문의 스케줄을 씁니다.

코드에서 t는 **0부터 셉니다**. 인덱스 0이 논문의 t = 1이고, 인덱스 T − 1이 논문의 t = T입니다.""",
     """T = 1000
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for kind in ("linear", "cosine"):
    s = du.make_schedule(kind, T, dtype=torch.float64)
    axes[0].plot(s.beta, label=kind)
    axes[1].plot(s.alpha_bar, label=f"{kind}: ᾱ_t")
    axes[1].plot(s.alpha_bar.sqrt(), "--", label=f"{kind}: √ᾱ_t")
    axes[2].semilogy(s.alpha_bar / (1 - s.alpha_bar), label=kind)
for ax, title in zip(axes, ("β_t", "signal kept", "SNR_t")):
    ax.set_title(title)
    ax.set_xlabel("t (index in code)")
    ax.legend()
plt.tight_layout()
plt.show()

s = du.make_schedule("linear", T, dtype=torch.float64)
print(f"index 0 (the paper's t = 1):   beta = {s.beta[0]:.1e}, alpha_bar = {s.alpha_bar[0]:.4f}")
print(f"index {T - 1} (the paper's t = T): beta = {s.beta[-1]:.3f}, alpha_bar = {s.alpha_bar[-1]:.1e}")
assert torch.allclose(s.alpha_bar, torch.cumprod(1 - s.beta, 0))  # ᾱ is the running product
assert s.alpha_bar[-1] < 1e-4  # almost nothing of the digit is left at t = T: x_T is noise"""),

    ("""## 2. The forward process q(x_t | x_0) (`q_sample`)

Thanks to Eq. 4 of the paper, x_t can be drawn in one step from the digit: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε with
ε ~ N(0, I). Each row is one test digit; the columns are t = 0, 50, 100, 200, 400, 600, 800 and 999.""",
     """## 2. 순방향 과정 q(x_t | x_0) (`q_sample`)

논문의 식 4 덕분에 x_t는 숫자에서 한 번에 뽑을 수 있습니다. x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, ε ~ N(0, I)입니다.
각 행은 테스트 숫자 하나이고, 열은 t = 0, 50, 100, 200, 400, 600, 800, 999입니다.""",
     """images, labels = load_images(DATA, train=False)
x0 = to_unit_range(images[:6])
steps = [0, 50, 100, 200, 400, 600, 800, 999]
eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
s32 = du.make_schedule("linear", T)
strips = torch.stack([du.q_sample(x0, torch.full((6,), t), eps, s32) for t in steps], 1)
show(strips.flatten(0, 1), nrow=len(steps), scale=1.5)"""),

    ("""The one-step formula must agree with adding noise step by step, x_t = √(1 − β_t) x_{t−1} + √β_t ε_t
(Eq. 2). Below, 1,000 copies of one digit are noised 300 times, one step at a time, and 1,000 more are drawn
with `q_sample` in one step: both have the same mean and variance per pixel, √ᾱ_t x_0 and 1 − ᾱ_t.""",
     """한 번에 뽑는 식은 한 단계씩 노이즈를 더하는 것, x_t = √(1 − β_t) x_{t−1} + √β_t ε_t (식 2)와 같아야 합니다.
아래에서는 숫자 하나를 1,000개 복사해 한 단계씩 300번 노이즈를 더하고, 1,000개를 더 `q_sample`로 한 번에
뽑습니다. 둘은 픽셀마다 평균과 분산이 같고, 그 값은 √ᾱ_t x_0과 1 − ᾱ_t입니다.""",
     """g = torch.Generator().manual_seed(1)
copies, stop = 1000, 300
digit = x0[:1].double().expand(copies, -1, -1, -1)
x = digit
for t in range(stop):  # Eq. 2, one step at a time
    x = (1 - s.beta[t]).sqrt() * x + s.beta[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
one_step = du.q_sample(digit, torch.full((copies,), stop - 1), torch.randn(digit.shape, generator=g, dtype=torch.float64), s)
a = s.alpha_bar[stop - 1]
mean_error = (x.mean(0) - one_step.mean(0)).abs().max()
var_ratio = x.var(0).mean() / one_step.var(0).mean()
print(f"after {stop} steps: largest difference of the means {mean_error:.4f}; variance, step by step "
      f"{x.var(0).mean():.4f}, in one step {one_step.var(0).mean():.4f}, 1 - alpha_bar = {1 - a:.4f}")
assert mean_error < 6 * (2 * (1 - a) / copies).sqrt()  # six standard errors of a difference of two means
assert abs(var_ratio - 1) < 0.02 and abs(one_step.var(0).mean() / (1 - a) - 1) < 0.02"""),

    ("""## 3. One training step by hand (Algorithm 1; `diffusion_loss`)

Training draws a step t and noise ε for each digit, makes x_t with `q_sample`, and asks the network
(`diffusion/model.py`: `UNet`) for ε̂ = ε_θ(x_t, t). The loss is ‖ε − ε̂‖² (the paper's L_simple). The cell
first loads a trained network, or trains a small one with the same command you would type.""",
     """## 3. 손으로 해 보는 학습 한 단계 (알고리즘 1, `diffusion_loss`)

학습은 숫자마다 단계 t와 노이즈 ε를 뽑고, `q_sample`로 x_t를 만든 뒤, 네트워크(`diffusion/model.py`: `UNet`)에
ε̂ = ε_θ(x_t, t)를 묻습니다. 손실은 ‖ε − ε̂‖²(논문의 L_simple)입니다. 이 셀은 먼저 학습된 네트워크를 불러오고,
없으면 여러분이 입력할 명령 그대로 작은 모델을 학습합니다.""",
     """trained = Path(os.environ.get("WALKTHROUGH_TRAINED", ROOT / "diffusion" / "checkpoints"))  # (the tests
folder = Path(os.environ.get("WALKTHROUGH_SMALL", ROOT / "notebooks" / "small-model"))  # point these elsewhere)
checkpoint = find_latest(trained) or find_latest(folder)
if checkpoint is None:
    command = [sys.executable, "-m", "diffusion.main", "--base-channels", "16", "--epochs", "2", "--limit-train",
               "20000", "--sample-every", "0", "--data-root", DATA.data_root, "--ckpt-dir", str(folder),
               "--out-dir", str(folder / "out"), *os.environ.get("WALKTHROUGH_TRAIN_FLAGS", "").split()]
    print("No trained checkpoint in diffusion/checkpoints: training a small model for a minute or two with\\n  "
          + " ".join(command[1:]) + "\\n(python -m diffusion.main trains the real one.)")
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    print(run.stdout)
    checkpoint = find_latest(folder)
loaded = load_network(checkpoint)
net, config = loaded.net, loaded.config
s = du.schedule_from_config(config)
print(f"{os.path.relpath(checkpoint, ROOT)}: {sum(p.numel() for p in net.parameters()):,} parameters, "
      f"{config.num_classes} classes, T = {s.T}, epoch {loaded.epoch}")

x0, y = to_unit_range(images[:8]), labels[:8]
g = torch.Generator().manual_seed(0)
t = torch.randint(0, s.T, (8,), generator=g)  # one step per digit, uniform
eps = torch.randn(x0.shape, generator=g)
xt = du.q_sample(x0, t, eps, s)
eps_hat = net(xt, t, y)
by_hand = (eps - eps_hat).square().mean()

library = du.diffusion_loss(lambda xt, t: net(xt, t, y), x0, s, generator=torch.Generator().manual_seed(0))
print(f"loss by hand {by_hand:.5f}, diffusion_loss {library:.5f}")
assert torch.allclose(by_hand, library)
show(torch.cat([x0, xt, eps_hat.clamp(-1, 1)]), nrow=8, title="x_0,   x_t,   the network's ε̂", scale=1.5)"""),

    ("""## 4. The reverse process (Algorithm 2; `diffusion/samplers.py`: `sample_ddpm`)

Sampling starts from pure noise x_T and takes T small steps back. At each step the network's ε̂ gives a guess
of the clean digit, x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (`predict_x0`), and the step moves x_t towards it with the
posterior q(x_{t−1} | x_t, x̂_0). For each digit, the top row is x_t and the bottom row x̂_0, at eight steps from
t = T − 1 down to 0: the guess is a blurry average early on and sharpens as the noise goes.""",
     """## 4. 역방향 과정 (알고리즘 2, `diffusion/samplers.py`: `sample_ddpm`)

샘플링은 순수한 노이즈 x_T에서 시작해 T번의 작은 단계로 되돌아갑니다. 단계마다 네트워크의 ε̂로 깨끗한 숫자를
추측하고, x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (`predict_x0`), 사후분포 q(x_{t−1} | x_t, x̂_0)로 x_t를 그쪽으로
옮깁니다. 숫자마다 윗줄은 x_t, 아랫줄은 x̂_0이고, t = T − 1에서 0까지 여덟 단계에서 찍었습니다. 처음에는
추측이 흐릿한 평균이지만, 노이즈가 걷힐수록 또렷해집니다.""",
     """from diffusion.samplers import SAMPLERS, guided, sampler_timesteps

digits = torch.tensor([0, 3, 7, 9])
model = guided(net, digits, 1.0, null_label=config.num_classes)  # w = 1: the conditional model, no guidance
noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
shown = {round(f * (s.T - 1)) for f in (1, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0)}
frames = {}


def keep(i, xt, x0_hat):
    t = s.T - 1 - i  # sample_ddpm runs t = T-1 down to 0
    if t in shown:
        frames[t] = (xt.clamp(-1, 1), x0_hat)


ddpm = SAMPLERS["ddpm"](model, noise.clone(), s, generator=torch.Generator().manual_seed(4), callback=keep)
order = sorted(frames, reverse=True)
for k in range(4):
    show(torch.cat([torch.cat([frames[t][0][k:k + 1] for t in order]),
                    torch.cat([frames[t][1][k:k + 1] for t in order])]), nrow=len(order), scale=1.3)
assert torch.equal(frames[0][0], ddpm.clamp(-1, 1))  # the last x_t is the sample"""),

    ("""DDIM (`sample_ddim`, Song et al. 2021) and DPM-Solver++ (`sample_dpmpp`, Lu et al. 2022) use the same
network but take 10 large steps instead of 1000: the same four digits, from the same noise. The rows are DDPM
(1000 steps), DDIM (10) and DPM-Solver++ (10). DDIM's steps are evenly spaced in t. DPM-Solver++'s first step goes
from pure noise straight to the noise level σ = √((1 − ᾱ_t) / ᾱ_t) = 8, above which the guess x̂_0 is hardly more
than the label's average digit, and the other nine are evenly spaced in log-SNR down to σ = 0.1.""",
     """DDIM(`sample_ddim`, Song et al. 2021)과 DPM-Solver++(`sample_dpmpp`, Lu et al. 2022)는 같은 네트워크로
1000번 대신 10번의 큰 단계를 밟습니다. 같은 노이즈에서 같은 네 숫자를 그립니다. 행은 위에서부터 DDPM(1000단계),
DDIM(10단계), DPM-Solver++(10단계)입니다. DDIM의 단계는 t에서 고른 간격입니다. DPM-Solver++는 첫 단계에서
순수한 노이즈로부터 노이즈 수준 σ = √((1 − ᾱ_t) / ᾱ_t) = 8까지 곧장 내려갑니다. 그보다 위에서는 추측한 x̂_0이
레이블의 평균 숫자와 거의 다르지 않기 때문입니다. 나머지 아홉 단계는 σ = 0.1까지 log-SNR에서 고른 간격입니다.""",
     """rows = [ddpm]
for name in ("ddim", "dpmpp"):
    steps = sampler_timesteps(name, s, 10)
    rows.append(SAMPLERS[name](model, noise.clone(), s, steps))
    print(f"{name}: the steps it visits, t = {steps}")
show(torch.cat(rows), nrow=4, scale=2)"""),

    ("""## 5. Guidance (`guided`; the defaults in `diffusion/recipe.py`)

The network learned both ε(x_t, label) and, with the label dropped 10% of the time, ε(x_t) without one.
Classifier-free guidance mixes them, ε = ε_u + w (ε_c − ε_u): w = 0 ignores the label, w = 1 is the conditional
model, and w > 1 pushes further from "any digit" towards "this digit". The rows are w = 0, 1, 2 and 4, from
the same noise.""",
     """## 5. 가이던스 (`guided`, 기본값은 `diffusion/recipe.py`)

네트워크는 ε(x_t, 레이블)과, 학습 중 10%는 레이블을 빼서 레이블 없는 ε(x_t)도 배웠습니다. classifier-free
가이던스는 둘을 섞습니다. ε = ε_u + w (ε_c − ε_u)에서 w = 0은 레이블을 무시하고, w = 1은 조건부 모델 그대로이며,
w > 1은 "아무 숫자"에서 "이 숫자" 쪽으로 더 밉니다. 행은 같은 노이즈에서 w = 0, 1, 2, 4입니다.""",
     """digits = torch.arange(8) % config.num_classes
noise = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5))
steps = sampler_timesteps("dpmpp", s, 10)
rows = [SAMPLERS["dpmpp"](guided(net, digits, w, config.num_classes), noise.clone(), s, steps) for w in (0, 1, 2, 4)]
show(torch.cat(rows), nrow=8, scale=1.5)

xt, t = noise, torch.full((8,), 500)
eps_c, eps_u = net(xt, t, digits), net(xt, t, torch.full((8,), config.num_classes))
assert torch.allclose(guided(net, digits, 1.0, config.num_classes)(xt, t), eps_c)
assert torch.allclose(guided(net, digits, 0.0, config.num_classes)(xt, t), eps_u)
assert torch.allclose(guided(net, digits, 2.5, config.num_classes)(xt, t), eps_u + 2.5 * (eps_c - eps_u), atol=1e-5)"""),

    ("""**Autoguidance** (Karras et al. 2024) guides with a weaker network of the same run instead of the model
without a label: the checkpoint at half the epochs. It pushes away from the mistakes that training was still
fixing, so it sharpens the digits without making them alike. This is what `python -m diffusion.sampling` does by
default; `choose_recipe` says so in one line. Top: classifier-free guidance with w = 2; bottom: the default
recipe.""",
     """**오토가이던스**(Karras et al. 2024)는 레이블 없는 모델 대신 같은 학습의 더 약한 네트워크, 즉 에폭 절반
시점의 체크포인트로 가이드합니다. 학습이 아직 고치던 실수에서 멀어지게 밀기 때문에, 숫자를 서로 닮게 만들지
않으면서 또렷하게 합니다. `python -m diffusion.sampling`이 기본으로 하는 일이 이것이고, `choose_recipe`가 그
내용을 한 줄로 알려 줍니다. 위: w = 2인 classifier-free 가이던스, 아래: 기본 레시피.""",
     """from diffusion.config import SampleConfig
from diffusion.generation import generate, load_guide
from diffusion.recipe import choose_recipe
from diffusion.runtime import Precision, Runtime

cpu = Runtime(torch.device("cpu"), Precision(False, False))
recipe = choose_recipe(config, SampleConfig(), task="sample", labelled=True, checkpoint=loaded.path, epoch=loaded.epoch)
plain = choose_recipe(config, SampleConfig(guide_checkpoint="none"), task="sample", labelled=True)
print("default:", recipe)
print("without a guide network:", plain)
rows = [generate(net, config, r, 8, digits, cpu, seed=6, weak=load_guide(r, loaded), progress=False)
        for r in (plain, recipe)]
show(torch.cat(rows), nrow=8, scale=1.5)
assert recipe.guide is None or recipe.guide.name == f"epoch_{loaded.epoch // 2:03d}.pth\""""),

    ("""## Where to go next

- Read the code in this order: `diffusion/diffusion_utils.py` (the schedule, `q_sample`, `diffusion_loss`),
  `diffusion/train.py` (the loop around it), `diffusion/samplers.py` (`sample_ddpm`, then DDIM, DPM-Solver++ and
  `guided`), and `diffusion/recipe.py` (which settings run by default, and why).
- `python -m diffusion.demo` opens a page where you can move a slider over t on a digit you draw, and watch
  x_t and x̂_0 while the sampler runs.
- `python -m diffusion.evaluate --bits-per-dim 1000` scores a checkpoint, including the paper's likelihood.""",
     """## 다음에 볼 것

- 코드는 이 순서로 읽어 보세요. `diffusion/diffusion_utils.py`(스케줄, `q_sample`, `diffusion_loss`),
  `diffusion/train.py`(그것을 감싼 학습 루프), `diffusion/samplers.py`(`sample_ddpm`, 그다음 DDIM, DPM-Solver++,
  `guided`), `diffusion/recipe.py`(기본으로 어떤 설정이 왜 쓰이는지).
- `python -m diffusion.demo`를 실행하면, 직접 그린 숫자 위에서 t 슬라이더를 움직여 보고, 샘플러가 도는 동안
  x_t와 x̂_0을 지켜볼 수 있는 페이지가 열립니다.
- `python -m diffusion.evaluate --bits-per-dim 1000`은 논문의 우도까지 포함해 체크포인트를 채점합니다.""",
     None),
]


def notebook(language: str):
    import nbformat

    cells = []
    for english, korean, code in STEPS:
        cells.append(nbformat.v4.new_markdown_cell(english if language == "en" else korean))
        if code:
            cells.append(nbformat.v4.new_code_cell(code))
    book = nbformat.v4.new_notebook(cells=cells)
    book.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                          "language_info": {"name": "python"}})
    return book


def main() -> None:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run them and store their outputs (the pictures)")
    args = parser.parse_args()
    for language, path in NOTEBOOKS.items():
        book = notebook(language)
        if args.execute:
            from nbclient import NotebookClient

            NotebookClient(book, timeout=900, resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(book, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
