"""Streams from data sets on disk (qtta_plugins.data.disk / layouts / cifar_c): tiny sets written
under tmp_path in every layout users have (RobustBench's CIFAR-10-C .npy files, an ImageNet-C tree
of JPEGs, a folder of domains, an image list), read through make_stream."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qtta_plugins import data
from qtta_plugins.data import disk

torch.set_num_threads(1)

N = 12  # images per severity in the CIFAR-10-C files
CIFAR_CORRUPTIONS = ["fog", "contrast"]
WNIDS = ["n01440764", "n01443537"]
COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fox": (0, 0, 255)}


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("QTTA_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """``<root>/CIFAR-10-C/{fog,contrast}.npy`` (5 x 12 images, 3 classes) + labels.npy."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        c: rng.integers(0, 256, (5 * N, 32, 32, 3), dtype=np.uint8) for c in CIFAR_CORRUPTIONS
    }
    for c, a in arrays.items():
        np.save(folder / f"{c}.npy", a)
    arrays["labels"] = np.tile(rng.permutation(np.arange(N) % 3), 5).astype(np.uint8)
    np.save(folder / "labels.npy", arrays["labels"])
    return root, arrays


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/ImageNet-C/{fog,contrast}/{1..5}/<wnid>/*.JPEG``: 3 solid-colour 8x8 JPEGs per
    wnid (red for the first wnid, blue for the second)."""
    root = tmp_path_factory.mktemp("imagenet")
    for c in CIFAR_CORRUPTIONS:
        for s in range(1, 6):
            for wnid, colour in zip(WNIDS, [(250, 0, 0), (0, 0, 250)], strict=True):
                folder = root / "ImageNet-C" / c / str(s) / wnid
                folder.mkdir(parents=True)
                for k in range(3):
                    image = Image.new("RGB", (8, 8), colour)
                    image.save(folder / f"ILSVRC2012_val_{k:08d}.JPEG", quality=100)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/{art,photo}/<class>/<i>.png``: solid 6x6 PNGs, the class's colour; art has cat and
    dog (2 each), photo cat, dog and fox (1 each)."""
    root = tmp_path_factory.mktemp("folder")
    for domain, classes, count in (("art", ["cat", "dog"], 2), ("photo", ["cat", "dog", "fox"], 1)):
        for cls in classes:
            (root / domain / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (6, 6), COLOURS[cls]).save(root / domain / cls / f"{i}.png")
    return root


def image_list(root: Path) -> Path:
    """An image list over the folder fixture's files: label = the class's index in COLOURS."""
    lines = [
        f"{p.relative_to(root).as_posix()} {list(COLOURS).index(p.parent.name)}"
        for p in sorted(root.rglob("*.png"))
    ]
    path = root / "list.txt"
    path.write_text("# path label\n" + "\n".join(lines) + "\n")
    return path


def vision(name: str):
    """torchvision or timm, imported through the zoo (a torchvision wheel of another torch build
    imports only so), or the test is skipped."""
    from qtta_plugins.models import zoo

    try:
        return zoo.import_torchvision() if name == "torchvision" else zoo.import_timm()
    except ImportError:
        pytest.skip(f"{name} is not installed")


def cifar_stream(root: Path, setting: str = "continual", **kw: object) -> disk.DiskStream:
    kw = {"corruptions": CIFAR_CORRUPTIONS, "batch_size": 5, "num_workers": 0, **kw}
    return data.make_stream(setting, "cifar10-c", root=root, **kw)


# ---------------------------------------------------------------------------- CIFAR-10-C


def test_cifar_c_batches_are_the_files_rows_in_the_label_order(cifar):
    root, arrays = cifar
    stream = cifar_stream(root, severity=2, rounds=2)
    batches = list(stream)
    assert len(batches) == len(stream) == 2 * 2 * 3  # rounds x domains x ceil(12 / 5)
    seen: dict[tuple[int, int], list[np.ndarray]] = {}
    for (r, d, index), b in zip(stream.plan(), batches, strict=True):
        assert (b.round, b.domain, b.sample_domains) == (r, CIFAR_CORRUPTIONS[d], None)
        local = index - stream._starts[d]
        seen.setdefault((r, d), []).append(local)
        expected = arrays[CIFAR_CORRUPTIONS[d]][N + local]  # severity 2: rows 12..23
        assert b.x.dtype == torch.float32 and b.x.shape == (len(local), 3, 32, 32)
        assert torch.equal(b.x, torch.from_numpy(expected).permute(0, 3, 1, 2).float() / 255)
        assert torch.equal(b.y, torch.from_numpy(arrays["labels"][N + local].astype(np.int64)))
    for (r, d), parts in seen.items():  # batches cut from the labels-only order
        assert np.array_equal(np.concatenate(parts), stream.permutation(r, d))
    assert [b.y.tolist() for b in stream] == [b.y.tolist() for b in batches]  # deterministic


def test_cifar_c_labels_of_one_severity_and_the_four_extra_corruptions(cifar, tmp_path):
    _, arrays = cifar
    folder = tmp_path / "CIFAR-100-C"
    folder.mkdir()
    np.save(folder / "speckle_noise.npy", arrays["fog"])  # a CIFAR-10-C extra corruption
    np.save(folder / "labels.npy", arrays["labels"][:N].astype(np.int64))  # n labels, not 5n
    stream = data.make_stream(
        "continual", "cifar100-c", root=tmp_path, corruptions="speckle_noise", severity=5
    )
    assert stream.domains == ["speckle_noise"] and stream.num_workers == disk.default_num_workers()
    assert sorted(torch.cat([b.y for b in stream]).tolist()) == sorted(arrays["labels"][:N])


def test_the_npy_files_are_memory_mapped_never_read_whole(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    big = np.random.default_rng(1).integers(0, 256, (5 * 400, 32, 32, 3), dtype=np.uint8)
    np.save(folder / "fog.npy", big)  # 6 MB
    np.save(folder / "labels.npy", np.tile(np.arange(400) % 10, 5))
    stream = data.make_stream("continual", "cifar10-c", root=tmp_path, corruptions=["fog"])
    stream.num_workers = 0
    tracemalloc.start()
    try:
        first = next(iter(stream))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.x.shape == (50, 3, 32, 32)
    assert peak < big.nbytes / 8, f"{peak} bytes allocated for a {big.nbytes}-byte file"
    (mapped,) = stream.dataset._arrays.values()
    assert isinstance(mapped, np.memmap) and mapped.shape == big.shape
    assert len(pickle.dumps(stream.dataset)) < 200_000  # what the workers get: no pixel data


def test_workers_give_the_same_batches_in_the_same_order(cifar, imagenet):
    root, _ = cifar
    for make in (
        lambda w: cifar_stream(root, "mixed", num_workers=w),
        lambda w: data.make_stream(
            "continual", "imagenet-c", root=imagenet, corruptions=CIFAR_CORRUPTIONS,
            severity=1, batch_size=4, num_workers=w,
        ),
    ):  # fmt: skip
        alone, workers = list(make(0)), list(make(2))
        assert len(alone) == len(workers) > 1
        for a, b in zip(alone, workers, strict=True):
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
            assert (a.domain, a.round, a.sample_domains) == (b.domain, b.round, b.sample_domains)


# ---------------------------------------------------------------------------- the settings


SOURCES = ["cifar10-c", "imagenet-c", "folder", "image-list"]


def source_stream(source: str, setting: str, roots: dict[str, Path], **kw: object):
    kw = {"batch_size": 4, "num_workers": 0, **kw}
    if setting == "long":
        kw["rounds"] = 2
    if source in ("cifar10-c", "imagenet-c"):
        kw["corruptions"] = CIFAR_CORRUPTIONS
    if source == "image-list":
        kw["image_list"] = image_list(roots[source])
    return data.make_stream(setting, source, root=roots[source], **kw)


@pytest.fixture(scope="module")
def roots(cifar, imagenet, folder) -> dict[str, Path]:
    return {"cifar10-c": cifar[0], "imagenet-c": imagenet, "folder": folder, "image-list": folder}


@pytest.mark.parametrize("setting", ["continual", "reset", "gradual", "mixed", "dirichlet", "long"])
@pytest.mark.parametrize("source", SOURCES)
def test_every_setting_on_every_disk_source(source, setting, roots):
    assert setting in data.SETTINGS
    if setting == "gradual" and source in ("folder", "image-list"):
        with pytest.raises(ValueError, match=r"no severities.*gradual"):
            source_stream(source, setting, roots, severity=None)
        return
    stream = source_stream(source, setting, roots)
    batches = list(stream)
    assert len(batches) == len(stream) > 0
    assert stream.reset_on_shift == (setting == "reset") and stream.mixed == (setting == "mixed")
    assert stream.order == ("dirichlet" if setting == "dirichlet" else "iid")
    rounds = 2 if setting == "long" else 1
    assert [b.round for b in batches][-1] == rounds - 1
    for b in batches:
        assert b.x.ndim == 4 and b.x.shape[1] == 3 and b.x.dtype == torch.float32
        assert b.y.dtype == torch.int64 and len(b.y) == len(b.x)
        if setting == "mixed":
            assert b.domain == data.MIXED and len(b.sample_domains) == len(b.y)
            assert set(b.sample_domains) <= set(stream.domains)
        else:
            assert b.domain in stream.domains and b.sample_domains is None
    if setting == "gradual":
        assert stream.domains[:9] == [f"fog-{s}" for s in data.GRADUAL_SEVERITIES]
    # every domain's samples once per round, labelled as the files say
    total = sum(len(d) for d in stream.sets) * rounds
    assert sum(len(b.y) for b in batches) == total


def test_the_order_comes_from_the_labels_alone_and_equals_the_in_memory_order(cifar, monkeypatch):
    root, arrays = cifar
    labels = torch.from_numpy(arrays["labels"][:N].astype(np.int64))
    in_memory = [data.ImageSet(torch.zeros(N, 1, 32, 32), labels, c) for c in CIFAR_CORRUPTIONS]
    for setting in ("dirichlet", "mixed", "continual"):
        order = "dirichlet" if setting == "dirichlet" else "iid"
        on_disk = cifar_stream(root, setting, seed=3, batch_size=4, severity=1)
        memory = data.ContinualStream(
            in_memory, batch_size=4, seed=3, order=order, mixed=setting == "mixed"
        )
        for d in [None] if setting == "mixed" else [0, 1]:
            assert np.array_equal(on_disk.permutation(0, d), memory.permutation(0, d))

        def boom(*args: object) -> None:
            raise AssertionError("an image was decoded to compute the order")

        with monkeypatch.context() as m:
            m.setattr(disk.DiskDataset, "__getitem__", boom)
            plan = list(on_disk.plan())
        got = [(b.domain, b.y.tolist(), b.sample_domains) for b in on_disk]
        want = [(b.domain, b.y.tolist(), b.sample_domains) for b in memory]
        assert got == want and len(plan) == len(got)


def test_per_domain_takes_the_same_stratified_samples_from_each_domain(cifar):
    root, _ = cifar
    stream = cifar_stream(root, per_domain=6, severity=1)
    assert [len(d) for d in stream.sets] == [6, 6]
    assert np.array_equal(stream.sets[0].rows, stream.sets[1].rows)
    assert sorted(stream.sets[0].labels.tolist()) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="per_domain"):
        cifar_stream(root, per_domain=N + 1)


# ---------------------------------------------------------------------------- ImageNet-C


def test_imagenet_c_labels_in_sorted_wnid_order_rgb_kept(imagenet):
    stream = data.make_stream(
        "continual", "imagenet-c", root=imagenet, corruptions=["contrast"], severity=2,
        batch_size=6, num_workers=0,
    )  # fmt: skip
    (batch,) = list(stream)
    assert batch.x.shape == (6, 3, 8, 8)
    red = batch.y == 0  # the first wnid in sorted order: red images
    assert red.sum() == 3
    means = batch.x.mean((2, 3))
    assert (means[red, 0] > 0.9).all() and (means[red, 2] < 0.1).all()
    assert (means[~red, 2] > 0.9).all() and (means[~red, 0] < 0.1).all()
    files = stream.sets[0].files
    assert files == sorted(files) and files[0].startswith(WNIDS[0] + "/")


def test_imagenet_c_image_list_and_class_order(imagenet, tmp_path):
    listed = [
        f"{WNIDS[1]}/ILSVRC2012_val_00000002.JPEG",
        f"{WNIDS[0]}/ILSVRC2012_val_00000000.JPEG",
    ]
    ids = tmp_path / "imagenet_test_image_ids.txt"
    ids.write_text("".join(f"{p} 0\n" for p in listed))
    order = tmp_path / "classes.txt"
    order.write_text(f"{WNIDS[1]}\n{WNIDS[0]}\n")  # the head's order: reversed
    stream = data.make_stream(
        "continual", "imagenet-c", root=imagenet, corruptions=CIFAR_CORRUPTIONS, severity=1,
        image_list=ids, class_order=order, num_workers=0,
    )  # fmt: skip
    assert [len(d) for d in stream.sets] == [2, 2]
    assert stream.sets[0].files is stream.sets[1].files  # one list shared by the domains
    assert stream.sets[0].labels.tolist() == [0, 1]  # blue is class 0 in that head
    batch = next(iter(stream))
    blue = batch.x.mean((2, 3))[:, 2] > 0.9
    assert torch.equal(blue, batch.y == 0)
    (tmp_path / "missing.txt").write_text(f"{WNIDS[0]}/nope.JPEG\n")
    with pytest.raises(FileNotFoundError, match=r"ImageNet-C/fog/1/n01440764/nope\.JPEG"):
        data.make_stream(
            "continual", "imagenet-c", root=imagenet, corruptions=["fog"], severity=1,
            image_list=tmp_path / "missing.txt",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"n01443537.*not in the class order"):
        data.make_stream(
            "continual", "imagenet-c", root=imagenet, corruptions=["fog"], severity=1,
            class_order=[WNIDS[0]],
        )  # fmt: skip


# ---------------------------------------------------------------------------- folder, list


def test_folder_domains_share_classes_by_name_and_the_transform_is_applied(folder):
    calls: list[tuple[str, tuple[int, int]]] = []

    def transform(image: Image.Image) -> torch.Tensor:
        calls.append((image.mode, image.size))
        return torch.from_numpy(np.array(image.resize((2, 2)))).permute(2, 0, 1).float()

    stream = data.make_stream(
        "continual", "folder", root=folder, transform=transform, batch_size=8, num_workers=0
    )
    assert stream.domains == ["art", "photo"]
    batches = list(stream)
    assert len(calls) == 7 and set(calls) == {("RGB", (6, 6))}
    for b in batches:
        assert b.x.shape[1:] == (3, 2, 2)
        for x, y in zip(b.x, b.y, strict=True):  # the class's colour, RGB as RGB
            assert x[:, 0, 0].tolist() == list(COLOURS[list(COLOURS)[y]])
    assert stream.sets[1].labels.tolist() == [0, 1, 2]  # cat, dog, fox: shared by name
    photo_only = data.make_stream("continual", "folder", root=folder, corruptions=["photo"])
    assert photo_only.domains == ["photo"]
    gray = data.make_stream("continual", "folder", root=folder, channels=1, num_workers=0)
    assert next(iter(gray)).x.shape[1] == 1


def test_image_list_domains_and_labels(folder):
    path = image_list(folder)
    stream = data.make_stream(
        "mixed", "image-list", root=folder, image_list=path.name, batch_size=3, num_workers=0
    )
    assert stream.domains == ["art", "photo"] and [len(d) for d in stream.sets] == [4, 3]
    for b in stream:
        for x, y in zip(b.x, b.y, strict=True):
            assert tuple(round(float(v) * 255) for v in x[:, 0, 0]) == COLOURS[list(COLOURS)[y]]
    bad = folder / "bad.txt"
    bad.write_text("art/cat/0.png cat\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected '<domain>/<path> <label>'"):
        data.make_stream("continual", "image-list", root=folder, image_list=bad)
    with pytest.raises(ValueError, match="needs image_list"):
        data.make_stream("continual", "image-list", root=folder)


def test_the_transforms_of_torchvision_weights_and_of_a_timm_model(folder):
    weights = vision("torchvision").models.ResNet18_Weights.IMAGENET1K_V1  # no download
    stream = data.make_stream(
        "continual", "folder", root=folder, transform=weights.transforms(), num_workers=0
    )
    x = next(iter(stream)).x
    assert x.shape == (4, 3, 224, 224) and x.min() < 0  # resized, cropped and normalized
    vit = vision("timm").create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=4
    )
    transform = disk.timm_transform(vit, input_size=(3, 32, 32), crop_pct=1.0)
    stream = data.make_stream("continual", "folder", root=folder, transform=transform)
    stream.num_workers = 0
    assert next(iter(stream)).x.shape == (4, 3, 32, 32)


def test_a_transform_that_gives_no_tensor_or_mixed_sizes_is_named(folder):
    stream = data.make_stream("continual", "folder", root=folder, transform=lambda im: im)
    stream.num_workers = 0
    with pytest.raises(TypeError, match=r"transform gave a .*Image.* not a tensor"):
        next(iter(stream))
    sizes = iter(range(1, 100))
    stream = data.make_stream(
        "continual", "folder", root=folder, num_workers=0,
        transform=lambda im: torch.zeros(3, next(sizes), 2),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"different shapes.*a transform that resizes"):
        next(iter(stream))


# ---------------------------------------------------------------------------- errors


def test_missing_files_and_folders_are_named_with_the_layout(cifar, imagenet, folder, tmp_path):
    root, _ = cifar
    with pytest.raises(FileNotFoundError) as info:
        cifar_stream(tmp_path)
    assert str(tmp_path / "CIFAR-10-C") in str(info.value) and "labels.npy" in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        cifar_stream(root, corruptions=["fog", "snow"])
    message = str(info.value)
    assert f"expected {root / 'CIFAR-10-C' / 'snow.npy'}" in message
    assert "<root>/CIFAR-10-C/<corruption>.npy" in message and "contrast, fog" in message
    with pytest.raises(FileNotFoundError, match=r"ImageNet-C/snow/5.*<corruption>/<severity>/"):
        data.make_stream("continual", "imagenet-c", root=imagenet, corruptions=["fog", "snow"])
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'ImageNet-C'} is not a folder"):
        data.make_stream("continual", "imagenet-c", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"folder\d*/sketch .*domains in .*: art, photo"):
        data.make_stream("continual", "folder", root=folder, corruptions=["sketch"])
    with pytest.raises(FileNotFoundError, match=r"image list .*nope.txt does not exist"):
        data.make_stream("continual", "image-list", root=folder, image_list="nope.txt")
    with pytest.raises(FileNotFoundError, match=r"FASHION-MNIST-C.*write_cifar_c_layout"):
        data.make_stream("continual", "fashion-mnist-c")
    broken = tmp_path / "broken" / "CIFAR-10-C"
    broken.mkdir(parents=True)
    (broken / "fog.npy").write_bytes(b"not an array")
    np.save(broken / "labels.npy", np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match=r"fog\.npy is not a \.npy array"):
        cifar_stream(broken.parent, corruptions=["fog"])


def test_options_the_source_does_not_take_are_refused(cifar, folder):
    root, _ = cifar
    with pytest.raises(ValueError, match=r"unknown source 'cifar10'.*on disk: cifar10-c"):
        data.make_stream("continual", "cifar10")
    with pytest.raises(ValueError, match=r"transform.*only for the sources on disk"):
        data.make_stream("continual", "digits", transform=lambda im: im)
    with pytest.raises(ValueError, match="pass root="):
        data.make_stream("continual", "cifar10-c")
    with pytest.raises(ValueError, match="n_test"):
        cifar_stream(root, n_test=5)
    with pytest.raises(ValueError, match="class_order"):
        cifar_stream(root, class_order=["a"])
    with pytest.raises(ValueError, match="severity argument"):
        data.make_stream("continual", "folder", root=folder, severity=3)
    for bad in ({"num_workers": -1}, {"batch_size": 0}, {"severity": 6}, {"order": "sorted"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cifar_stream(root, **bad)


# ---------------------------------------------------------------------------- our own sets


def test_fashion_mnist_c_written_in_the_cifar_c_layout_is_read_by_the_same_reader(
    tmp_path, monkeypatch
):
    source = "fashion-mnist" if Path(data.FASHION_MNIST_DIR).is_dir() else "digits"
    corruptions = ["gaussian_noise", "contrast"]
    folder = data.write_cifar_c_layout(source, tmp_path, corruptions=corruptions, n=4)
    assert folder == tmp_path / f"{source.upper()}-C"
    assert sorted(p.name for p in folder.iterdir()) == ["contrast.npy", "gaussian_noise.npy", "labels.npy"]  # fmt: skip
    written = np.load(folder / "contrast.npy", mmap_mode="r")
    assert written.shape == (20, 32, 32, 3) and written.dtype == np.uint8
    assert (written[..., 0] == written[..., 2]).all()  # gray replicated to RGB
    labels = np.load(folder / "labels.npy")
    assert len(labels) == 20 and (labels[:4] == labels[16:]).all()

    # the same images as the corruption code gives the sources in memory
    test = data.load_source(source)[1] if source == "digits" else None
    if test is None:
        from qtta_plugins.data.sources import _load_test

        test = _load_test(source, None, 32, None, 0)
    first = data.ImageSet(test.x[:4], test.y[:4], "first4")
    stream = data.make_stream(
        "continual", f"{source}-c", root=tmp_path, corruptions=corruptions, severity=3,
        channels=1, num_workers=0, batch_size=4,
    )  # fmt: skip
    for b, c in zip(stream, corruptions, strict=True):
        perm = torch.from_numpy(stream.permutation(0, corruptions.index(c)))
        expected = data.corrupt_set(first, c, 3)
        assert torch.equal(b.x, expected.x[perm]) and torch.equal(b.y, expected.y[perm])

    # complete files are skipped; a partial one is written again
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a complete file")

    monkeypatch.setattr("qtta_plugins.data.cifar_c.corrupt_set", boom)
    data.write_cifar_c_layout(source, tmp_path, corruptions=corruptions, n=4)
    np.save(folder / "contrast.npy", np.zeros((5, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(AssertionError, match="recomputed"):
        data.write_cifar_c_layout(source, tmp_path, corruptions=corruptions, n=4)
    assert not list(folder.glob("*.tmp"))  # the failed write left no temporary
    with pytest.raises(ValueError, match="already holds another set"):
        data.write_cifar_c_layout(source, tmp_path, corruptions=corruptions, n=3)


# ---------------------------------------------------------------------------- end to end


def test_a_disk_stream_adapts_end_to_end_as_the_same_batches_in_memory(cifar):
    pytest.importorskip("torchao")
    import qtta_plugins
    from qtta_plugins.models import SmallBNCNN

    root, arrays = cifar
    torch.manual_seed(0)
    model = SmallBNCNN(num_classes=3, in_channels=3, width=8).eval()
    calib = [torch.rand(8, 3, 32, 32) for _ in range(2)]
    qmodel = qtta_plugins.quantize(model, "torchao", "w8a8", calib)
    stream = cifar_stream(root, severity=4, batch_size=6)
    run = qtta_plugins.adapt(qmodel, stream, "tent")

    memory = []  # the same rows, from the whole arrays in memory, in the stream's order
    for r, d, index in stream.plan():
        rows = N * 3 + index - stream._starts[d]
        x = torch.from_numpy(arrays[CIFAR_CORRUPTIONS[d]][rows]).permute(0, 3, 1, 2) / 255
        y = torch.from_numpy(arrays["labels"][rows].astype(np.int64))
        memory.append(data.Batch(x=x.float(), y=y, domain=CIFAR_CORRUPTIONS[d], round=r))
    again = qtta_plugins.adapt(qmodel, memory, "tent")
    assert len(run.predictions) == 2 * N
    assert torch.equal(run.predictions, again.predictions)
    assert run.errors() == again.errors() and list(run.errors()) == [*CIFAR_CORRUPTIONS, "mean"]
