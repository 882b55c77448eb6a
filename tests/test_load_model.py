"""qtta_plugins.models.load_model: torchvision / timm / factory architectures with local
checkpoint files, RobustBench-style wrapped dicts, and the weights_only / trusted rule."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from qtta_plugins.models import SmallBNCNN, UntrustedCheckpointError, load_model

torch.set_num_threads(1)

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def vision(name: str):
    """torchvision or timm through the zoo (the only way this machine's torchvision imports)."""
    from qtta_plugins.models import zoo

    try:
        return zoo.import_torchvision() if name == "torchvision" else zoo.import_timm()
    except ImportError:
        pytest.skip(f"{name} is not installed")


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor = X) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    tv = vision("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=7).eval()
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_a_torchvision_state_dict_loads_back_with_its_head_size(resnet):
    model, path = resnet
    loaded = load_model("torchvision:resnet18", path)  # num_classes from fc.weight
    assert loaded.fc.out_features == 7 and not loaded.training
    assert same_outputs(model, loaded)
    assert same_outputs(model, load_model("torchvision:resnet18", str(path), num_classes=7))


def test_a_timm_checkpoint_loads_back(tmp_path):
    timm = vision("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=4
    ).eval()
    path = tmp_path / "vit.pth"
    torch.save({"epoch": 3, "state_dict": vit.state_dict()}, path)
    loaded = load_model("timm:vit_tiny_patch16_224", path, img_size=32, patch_size=4)
    assert loaded.head.out_features == 5 and same_outputs(vit, loaded)
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    torch.save(resnet.state_dict(), tmp_path / "r10t.pth")
    assert same_outputs(resnet, load_model("timm:resnet10t", tmp_path / "r10t.pth"))


def test_a_robustbench_style_dict_with_ddp_prefixes(resnet, tmp_path):
    model, _ = resnet
    wrapped = {"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    wrapped["optimizer"] = {"lr": 0.1}
    torch.save(wrapped, tmp_path / "rb.pt")
    assert same_outputs(model, load_model("torchvision:resnet18", tmp_path / "rb.pt"))
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")  # older saves lack num_batches_tracked
    assert same_outputs(model, load_model("torchvision:resnet18", tmp_path / "old.pt"))


def test_a_pickled_module_needs_trusted(resnet, tmp_path):
    model, _ = resnet
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UntrustedCheckpointError) as info:
        load_model("torchvision:resnet18", path)
    message = str(info.value)
    assert str(path) in message and "trusted=True" in message
    assert "runs code" in message and "ResNet" in message  # why, how, and what it holds
    with pytest.raises(UntrustedCheckpointError, match="trusted=True"):
        load_model(path)
    assert same_outputs(model, load_model("torchvision:resnet18", path, trusted=True))
    whole = load_model(path, trusted=True)
    assert type(whole).__name__ == "ResNet" and same_outputs(model, whole)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt holds no whole model.*torchvision:resnet18"):
        load_model(tmp_path / "state.pt")


def test_a_factory_spec(tmp_path, monkeypatch):
    module = types.ModuleType("my_models")
    module.small = lambda num_classes=10, in_channels=1: SmallBNCNN(num_classes, in_channels)
    module.fixed = lambda: SmallBNCNN(num_classes=4)
    module.not_a_model = lambda: "model"
    monkeypatch.setitem(sys.modules, "my_models", module)
    torch.manual_seed(0)
    model = SmallBNCNN(num_classes=6, in_channels=3).eval()
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    loaded = load_model("my_models:small", tmp_path / "mine.pt", in_channels=3)
    assert loaded.fc.out_features == 6 and same_outputs(model, loaded)
    assert load_model("my_models:small", num_classes=2).fc.out_features == 2  # random weights
    with pytest.raises(ValueError, match="takes no num_classes"):
        load_model("my_models:fixed", num_classes=4)
    with pytest.raises(ValueError, match=r"mine\.pt does not fit SmallBNCNN.*shapes that differ"):
        load_model("my_models:fixed", tmp_path / "mine.pt")  # 4 classes in the factory, 6 saved
    with pytest.raises(TypeError, match=r"not a torch\.nn\.Module"):
        load_model("my_models:not_a_model")
    with pytest.raises(ValueError, match=r"cannot import 'no_such_pkg\.models' \(No module named"):
        load_model("no_such_pkg.models:net")


def test_missing_and_mismatched_files_are_named(resnet, tmp_path):
    _, path = resnet
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth does not exist"):
        load_model("torchvision:resnet18", missing)
    with pytest.raises(ValueError) as info:
        load_model("torchvision:resnet34", path)  # other blocks: missing keys
    assert str(path) in str(info.value) and "missing keys: layer1.2" in str(info.value)
    with pytest.raises(ValueError, match=r"resnet18\.pth: its last layer has 7 classes.*=10"):
        load_model("torchvision:resnet18", path, num_classes=10)
    state = torch.load(path, weights_only=True)
    state["conv1.weight"] = state["conv1.weight"][:, :1]
    state["extra.bias"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        load_model("torchvision:resnet18", tmp_path / "bad.pth")
    message = str(info.value)
    assert "bad.pth does not fit ResNet" in message and "unexpected keys: extra.bias" in message
    assert "conv1.weight (file (64, 1, 7, 7), model (64, 3, 7, 7))" in message
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pth is not a checkpoint"):
        load_model("torchvision:resnet18", tmp_path / "text.pth")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match=r"nostate\.pth holds no state dict.*epoch, lr"):
        load_model("torchvision:resnet18", tmp_path / "nostate.pth")


def test_bad_specs_and_downloads_are_refused():
    vision("torchvision")
    with pytest.raises(ValueError, match="did you mean resnet18"):
        load_model("torchvision:resnet181")
    with pytest.raises(ValueError, match="unknown model spec"):
        load_model("resnet18")
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_model("timm:resnet10t", pretrained=True)
    with pytest.raises(ValueError, match="num_classes"):
        load_model("torchvision:resnet18", num_classes=0)
