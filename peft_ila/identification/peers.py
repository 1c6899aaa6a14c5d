"""The layer selections a PEFT user already has, to compare ILA's with: each picks k of the candidate layers
without training (random, as HFT draws them; KappaTune; Spectrum-style signal-to-noise ratio). `PEERS` names them
as a `Recipe`'s `layers` does."""

from __future__ import annotations

import math
import random

import torch
from peft.helpers import find_kappa_target_modules
from torch import nn


def random_layers(candidates: list[str], k: int, seed: int) -> list[str]:
    """k candidates drawn uniformly with `seed`."""
    return random.Random(seed).sample(candidates, k)


def kappa_layers(model: nn.Module, candidates: list[str], k: int) -> list[str]:
    """KappaTune (peft.helpers.find_kappa_target_modules): the k candidates whose weights have the lowest condition
    number, i.e. the most isotropic ones (peft ranks all nn.Linear; the candidates are kept in its order)."""
    ranked = find_kappa_target_modules(model, top_p=1.0, show_progress=False)["target_modules"]
    wanted = set(candidates)
    return [name for name in ranked if name in wanted][:k]


def spectrum_snr(weight: torch.Tensor) -> float:
    """Spectrum-style signal-to-noise ratio of a weight matrix: singular values above the Marchenko-Pastur edge of a
    random matrix with the same shape and entry std count as signal, the rest as noise; SNR = sum(signal) /
    sum(noise), divided by the largest singular value to compare matrices of different scale."""
    w = weight.detach().float()
    rows, cols = w.shape
    s = torch.linalg.svdvals(w)
    edge = w.std() * (math.sqrt(rows) + math.sqrt(cols))
    signal, noise = s[s > edge].sum(), s[s <= edge].sum()
    return float(signal / noise / s[0]) if noise > 0 else math.inf


def spectrum_layers(model: nn.Module, candidates: list[str], k: int) -> list[str]:
    """The k candidates with the highest Spectrum-style SNR (ties in candidate order)."""
    scores = {name: spectrum_snr(model.get_submodule(name).weight) for name in candidates}
    return sorted(candidates, key=lambda name: -scores[name])[:k]


PEERS = ("random", "kappa", "spectrum")


def peer_layers(peer: str, model: nn.Module, candidates: list[str], k: int, seed: int) -> list[str]:
    """The k candidates selector `peer` (one of `PEERS`) picks on `model`; `seed` draws the random one."""
    if peer == "random":
        return random_layers(candidates, k, seed)
    if peer == "kappa":
        return kappa_layers(model, candidates, k)
    if peer == "spectrum":
        return spectrum_layers(model, candidates, k)
    raise ValueError(f"unknown peer selector {peer!r}; use one of {', '.join(PEERS)}.")
