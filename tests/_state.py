"""State comparisons the tests share: has a model changed, and where."""

from __future__ import annotations

import torch


def model_state(model: torch.nn.Module, *, batch_counts: bool = True) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state dict. ``batch_counts=False`` leaves out the norms'
    ``num_batches_tracked``: torchao's pt2e graph counts every forward there, and they feed
    nothing the model computes."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if batch_counts or not k.endswith("num_batches_tracked")
    }


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same keys, and bit-identical tensors under each."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
