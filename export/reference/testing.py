"""Checkpoints with random weights in the original's layout, for tests, benchmarks and demos.

BatchNorm statistics are made non-trivial (random running means and variances) so that a wrong
BatchNorm fold or a missing one shows in parity checks.
"""
from __future__ import annotations

import torch

from export.contract.config import ModelConfig
from export.reference.model import NFormerModel


def random_model(config: ModelConfig, seed: int = 0) -> NFormerModel:
    gen = torch.Generator().manual_seed(seed)
    model = NFormerModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("nformer.") and name.endswith(".w"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))  # the original's Conv1D init
            elif p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif name.endswith((".g", "weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
            elif name.endswith("num_batches_tracked"):
                buf.fill_(1000)
    return model.eval()


def original_state_dict(model: NFormerModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """``model``'s weights as the original training code saves them (training heads included)."""
    gen = torch.Generator().manual_seed(seed + 1)
    c = model.config
    state = dict(model.state_dict())
    state["backbone.classifier.weight"] = 0.001 * torch.randn(c.num_classes, c.feature_dim, generator=gen)
    state["nformer.classifier.weight"] = 0.001 * torch.randn(c.num_classes, c.n_embd, generator=gen)
    return state


def save_random_checkpoint(path, config: ModelConfig | None = None, seed: int = 0) -> NFormerModel:
    model = random_model(config or ModelConfig(), seed)
    torch.save(original_state_dict(model, seed), path)
    return model


def clustered_features(n: int, dim: int = 256, seed: int = 0, identities: int | None = None,
                       spread: float = 0.35, duplicates: int = 0):
    """Unit-norm features like a real gallery: identity centres plus per-image noise.

    ``duplicates`` rows at the end are exact copies of earlier rows (a group larger than k included
    when there is room), the case where neighbour ties must be broken the same way everywhere.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    identities = identities or max(1, n // 8)
    centres = rng.standard_normal((identities, dim))
    x = centres[rng.integers(0, identities, size=n)] + spread * rng.standard_normal((n, dim))
    if duplicates and n > 1:
        dup = min(duplicates, n - 1)
        x[n - dup:] = x[rng.integers(0, n - dup, size=dup)]
        big = min(dup, 30)
        x[n - big:] = x[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)
