"""Where and how the network runs: one object for the device, bf16 autocast and the convolutions' memory format,
applied the same way by training and by sampling (diffusion/autotune.py picks it)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diffusion.errors import UserError


@dataclass(frozen=True)
class Precision:
    bf16: bool  # autocast to bfloat16
    channels_last: bool  # memory format of the convolutions' inputs and weights

    def describe(self) -> str:
        return f"{'bf16' if self.bf16 else 'fp32'} + {'channels_last' if self.channels_last else 'NCHW'}"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: Precision = Precision(False, False)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.precision.channels_last else torch.contiguous_format

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module on this device, in this memory format."""
        return module.to(device=self.device, memory_format=self.memory_format)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images on this device, in this memory format."""
        return x.to(self.device).contiguous(memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.bf16)


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device torch knows ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but torch sees no GPU here")
    return device
