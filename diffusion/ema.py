"""Power-function EMAs of the weights (Karras et al. 2024, EDM2, Sec. 3), kept beside the one sampling uses so that
the averaging length can be chosen after training, with the scorecard (bench/ema.py).

At step n (from 1) each track moves to beta_n * track + (1 - beta_n) * weights with beta_n = (1 - 1/n)^(gamma + 1):
an average of the whole run whose weight grows as a power of the step, so its length scales with the run. EDM2
names a track by sigma_rel, the std of that weighting over the run's length: a small sigma_rel averages only the
last few percent of the steps.
"""
from __future__ import annotations

import torch


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma whose power-function EMA has relative std sigma_rel (EDM2 Eq. 2 solved for gamma):
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), which falls as gamma grows; found by bisection."""
    def rel_std(gamma: float) -> float:
        return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5
    low, high = -0.999, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if rel_std(mid) > sigma_rel else (low, mid)
    return (low + high) / 2


def beta(n, gamma: float):
    """How much of the track stays at step n >= 1 (an int, or a tensor of them); 0 at the first step, so a track
    starts as the weights."""
    return (1 - 1 / n) ** (gamma + 1)


class EmaTracks:
    """One power-function EMA of a module's state per sigma_rel, updated every step with one fused lerp each."""

    def __init__(self, module: torch.nn.Module, sigma_rels: tuple[float, ...] | None):
        self.module = module
        self.params = list(module.parameters())  # the same tensors every step: listed once
        self.gammas = {f"{s:g}": gamma_of(s) for s in sigma_rels or ()}
        self.tracks = {name: [p.detach().clone() for p in module.parameters()] for name in self.gammas}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After training step `step` (counted from 1)."""
        for name, track in self.tracks.items():
            torch._foreach_lerp_(track, self.params, 1 - beta(step, self.gammas[name]))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """{sigma_rel: a state dict of the module with the track's parameters}."""
        names = [name for name, _ in self.module.named_parameters()]
        return {s: {**self.module.state_dict(), **dict(zip(names, track))} for s, track in self.tracks.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        names = [name for name, _ in self.module.named_parameters()]
        for s, track in self.tracks.items():
            for t, name in zip(track, names):
                t.copy_(state[s][name])
