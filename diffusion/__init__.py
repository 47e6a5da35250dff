"""DDPM (Ho et al. 2020) on MNIST: a small, fast, well-tested PyTorch implementation."""
