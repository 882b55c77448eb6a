"""The scale traps of issue 35 (part 6), each pinned by a test that failed before its fix:

- calibration data is read lazily, only what is used (``quantize``, ``reconstruct``, RTF-Q's bank):
  a ``DataLoader`` over a training set is never read in full;
- ``reconstruct`` holds one tensor of the images it uses (``calib_images``), not every batch given;
- RTF-Q's bank, ``train_bank`` and ``evaluate`` take batches / a ``DataLoader`` as ``quantize`` does,
  the older tensor forms still taken (and giving the same bank);
- ``check_batch`` checks a CPU batch for NaN / Inf on the host, before it is copied to the model's
  device (no device sync for a loader's batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import qtta_plugins
from qtta_plugins.adaptation import calibration_batches, check_batch
from qtta_plugins.errors import BadBatchError
from qtta_plugins.methods.rtfq import RTFQConfig, SubnetBank, train_bank
from qtta_plugins.methods.rtfq.data import _index_batches
from qtta_plugins.view import kept_source_statistics

pytest.importorskip("torchao")

ONE = {"widths": (1.0,), "resolutions": (32,), "bits": (8,), "recalib_images": 128}  # one subnet


class Counting:
    """An iterable over ``items`` that counts how many were read (over all passes)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = items
        self.read = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.read += 1
            yield item


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- calibration_batches ---------------------------------------------------------------------------
def test_calibration_batches_reads_only_what_is_used_and_names_bad_data() -> None:
    endless = (torch.rand(32, 1, 8, 8) for _ in itertools.count())
    # 8 batches for the backend, 512 images for the source statistics: 16 batches of 32
    assert len(calibration_batches(endless, "quantize", batches=8, images=512)) == 16
    pairs = [(torch.rand(64, 1, 8, 8), torch.zeros(64, dtype=torch.long)) for _ in range(20)]
    got = calibration_batches(pairs, "quantize", batches=8, images=512)
    assert len(got) == 8 and all(g is p[0] for g, p in zip(got, pairs, strict=False))
    assert len(calibration_batches(pairs, "quantize")) == 20  # no bound: everything
    with pytest.raises(TypeError, match=r"calib must be a tensor or an iterable.*not int"):
        calibration_batches(3, "quantize")
    with pytest.raises(BadBatchError, match=r"batch 1 is a torch\.int64 tensor"):
        calibration_batches([torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long)], "quantize")
    with pytest.raises(ValueError, match="calib is empty"):
        calibration_batches(iter(()), "quantize")


def test_quantize_reads_only_the_batches_it_uses_from_a_loader(float_cnn, digits, calib) -> None:
    train, _ = digits
    loader = Counting(DataLoader(TensorDataset(train.x, train.y), batch_size=64))
    qmodel = qtta_plugins.quantize(float_cnn, "torchao", "w8a8", loader)
    assert loader.read == 8, loader.read  # of 21: calib_batches=8, 512 images
    # the same model as from those 8 batches given as a list (not the session's qcnn, which other
    # tests run forward: torchao's pt2e graphs count num_batches_tracked on every forward)
    assert _states_equal(qmodel, qtta_plugins.quantize(float_cnn, "torchao", "w8a8", calib))
    assert kept_source_statistics(qmodel).images == 512


# --- reconstruct -----------------------------------------------------------------------------------
def test_reconstruct_reads_and_holds_only_the_images_it_uses(float_cnn, qcnn, digits) -> None:
    train, _ = digits
    batches = [train.x[i : i + 64] for i in range(0, 1280, 64)]  # 20 batches, 1280 images
    qm = qcnn["w4a4"]
    loader = Counting(batches)
    options = {"iters": 2, "calib_images": 256}
    out = qtta_plugins.reconstruct(qm, float_cnn, loader, "qdrop", **options)
    assert loader.read == 8, loader.read  # 512 images: the 256 used, and the source statistics'
    first = qtta_plugins.reconstruct(qm, float_cnn, batches[:4], "qdrop", **options)
    assert _states_equal(out, first)  # the rounding learned on those 256 images alone
    # in memory and more than it uses: cut, with a warning that says so
    with pytest.warns(UserWarning, match="uses the first 256 of the 1280 calibration images"):
        cut = qtta_plugins.reconstruct(qm, float_cnn, torch.cat(batches), "qdrop", **options)
    assert _states_equal(cut, first)
    with pytest.raises(ValueError, match="calib_images"):
        qtta_plugins.reconstruct(qm, float_cnn, batches, "qdrop", calib_images=0)


# --- RTF-Q ------------------------------------------------------------------------------------------
def test_bank_reads_its_calibration_images_from_a_loader(float_cnn, digits) -> None:
    train, _ = digits
    loader = Counting(DataLoader(TensorDataset(train.x, train.y), batch_size=32))
    bank = SubnetBank(float_cnn, loader, RTFQConfig(**ONE))
    assert loader.read == 4, loader.read  # recalib_images=128 of 1297
    assert torch.equal(bank.calib, train.x[:128])
    assert _states_equal(bank, SubnetBank(float_cnn, train.x[:128], RTFQConfig(**ONE)))
    with pytest.raises(TypeError, match="calib must be"):
        SubnetBank(float_cnn, 5, RTFQConfig(**ONE))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"float image batches \(N, C, H, W\)"):
        SubnetBank(float_cnn, [train.x[:8, 0]], RTFQConfig(**ONE))


def test_train_bank_takes_batches_and_a_loader(float_cnn, digits) -> None:
    """Batches that are the tensor form's own draws give the same bank, bit for bit; a loader is
    read again from the start when it runs out; anything else is a clear error."""
    train, test = digits
    cfg = RTFQConfig(train_steps=2, batch_size=16, progress=False, **ONE)
    xs, ys, xt = train.x[:64], train.y[:64], train.x[64:128]
    by_tensors = SubnetBank(float_cnn, train.x[:128], cfg)
    train_bank(by_tensors, (xs, ys), xt)
    gen = torch.Generator().manual_seed(cfg.seed)  # the tensor form's draws, in its order
    draw_s, draw_t = _index_batches(64, 16, gen), _index_batches(64, 16, gen)
    source, target = [], []
    for _ in range(cfg.train_steps):
        i, j = next(draw_s), next(draw_t)
        source.append((xs[i], ys[i]))
        target.append((xt[j], torch.zeros(len(j), dtype=torch.long)))  # labels unused
    by_batches = SubnetBank(float_cnn, train.x[:128], cfg)
    train_bank(by_batches, source, target)
    assert _states_equal(by_batches, by_tensors)

    # loaders shorter than the steps: read again from the start (2 batches each, 3 steps)
    loader_s = Counting(DataLoader(TensorDataset(xs[:32], ys[:32]), batch_size=16))
    loader_t = DataLoader(TensorDataset(xt[:32]), batch_size=16)
    bank = SubnetBank(float_cnn, train.x[:128], cfg)
    train_bank(bank, loader_s, loader_t, RTFQConfig(train_steps=3, progress=False, **ONE))
    assert loader_s.read == 3
    rows = bank.evaluate(test.x[:96], test.y[:96])
    by_loader = bank.evaluate(DataLoader(TensorDataset(test.x[:96], test.y[:96]), batch_size=40))
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in by_loader]

    cfg = RTFQConfig(train_steps=3, batch_size=16, progress=False, **ONE)
    with pytest.raises(ValueError, match="after 2: it is an iterator, read once"):
        train_bank(bank, iter(source), target, cfg)
    with pytest.raises(TypeError, match="source needs labels"):
        train_bank(bank, xs, xt, cfg)
    with pytest.raises(TypeError, match=r"source batches must be \(x, y\) pairs"):
        train_bank(bank, [xs[:16]], xt, cfg)
    with pytest.raises(TypeError, match="target must be"):
        train_bank(bank, (xs, ys), 3, cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least batch_size=16"):
        train_bank(bank, (xs[:8], ys[:8]), xt, cfg)


# --- check_batch ------------------------------------------------------------------------------------
def test_a_bad_loader_batch_is_refused_on_the_host_before_any_copy(monkeypatch) -> None:
    """A CPU batch for a model on an accelerator is checked where it is: a NaN is found without
    copying the batch to the device (nor a device sync to read the answer back)."""
    moved: list[Any] = []
    real_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        moved.append(args or kwargs)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    x = torch.zeros(4, 1, 8, 8)
    x[1, 0, 2, 3] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    with pytest.raises(BadBatchError, match="2 NaN or Inf value"):
        check_batch(x, (1, 8, 8), torch.device("cuda"))
    assert moved == []
    # on the model's own device nothing is copied either
    assert check_batch(torch.zeros(4, 1, 8, 8), (1, 8, 8), torch.device("cpu")) is not None
    assert moved == []
