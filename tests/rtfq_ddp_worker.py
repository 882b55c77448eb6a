"""Worker for tests/test_rtfq.py's 2-process run: ``torchrun --nproc_per_node=2`` (gloo, CPU).

Arguments: a directory holding ``inputs.pt`` (float model state, source and target tensors); every
rank writes its trained bank's state there as ``rank{R}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qtta_plugins.methods.rtfq import RTFQConfig, SubnetBank, train_bank
from qtta_plugins.models import build


def main(folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        data = torch.load(Path(folder) / "inputs.pt", weights_only=False)
        model = build("bncnn")
        model.load_state_dict(data["model"])
        bank = SubnetBank(model.eval(), data["target"][:128], RTFQConfig(**data["config"]))
        train_bank(bank, data["source"], data["target"])
        state = {k: v.detach().clone() for k, v in bank.state_dict().items()}
        torch.save(state, Path(folder) / f"rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
