"""LPIPS (*The Unreasonable Effectiveness of Deep Features as a Perceptual Metric*, Zhang et al., CVPR 2018):

    d(x, y) = Σ_l mean_{h,w} ‖ w_l ⊙ (f̂_l(x) − f̂_l(y)) ‖²        f̂_l: layer-l features, unit length per pixel

torchmetrics' implementation, with its bundled linear heads w_l (the LPIPS v0.1 files) and the backbone
(torchvision's AlexNet, VGG16 or SqueezeNet 1.1) read from a file the user gives: nothing is downloaded.
PIE-Bench uses SqueezeNet (``squeezenet1_1-b8a52dc0.pth``); MagicBrush and most papers AlexNet or VGG.
Background LPIPS: clean = the spatial LPIPS map averaged over background pixels; PIE-Bench = LPIPS of both
images with the edit region zeroed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .pixels import masked_mean

BACKBONES = {"squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth"),
             "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
             "vgg": ("vgg16", "vgg16-397923af.pth")}


def backbone_kind(path: Path) -> str:
    """alex / vgg / squeeze from a torchvision weights file's name."""
    name = Path(path).name.lower()
    for kind, (model, _) in BACKBONES.items():
        if name.startswith(model) or name.startswith(kind):
            return kind
    raise ValueError(f"{path}: cannot tell the LPIPS backbone from the file name; name it like torchvision's files "
                     f"({', '.join(f for _, f in BACKBONES.values())})")


def load_lpips(path: Path):
    """torchmetrics' LPIPS network with its bundled heads and the torchvision backbone weights in ``path``."""
    import torchvision
    from torchmetrics.functional.image.lpips import _LPIPS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--lpips {path}: no such file (a torchvision backbone, e.g. "
                                f"{BACKBONES['squeeze'][1]})")
    kind = backbone_kind(path)
    trunk = getattr(torchvision.models, BACKBONES[kind][0])(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        trunk.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: not a torchvision {BACKBONES[kind][0]} state dict ({str(err)[:120]})") from None
    net = _LPIPS(pretrained=True, net=kind, spatial=True, pnet_rand=True)
    for block in net.net.modules():  # torchmetrics' slices hold torchvision's feature layers under their index
        if isinstance(block, torch.nn.Sequential) and block._modules and all(k.isdigit() for k in block._modules):
            for key in block._modules:
                block._modules[key] = trunk.features[int(key)]
    return net.eval().requires_grad_(False)


@torch.no_grad()
def lpips_map(net, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The spatial LPIPS map [H, W] of two [3, H, W] images in [0, 1]."""
    return net(a[None].float(), b[None].float(), normalize=True)[0, 0]


def background_lpips(net, output: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None,
                     compat: bool = False) -> float:
    if mask is None:
        return float(lpips_map(net, output, source).mean())
    keep = ~mask
    if not keep.any():
        return math.nan
    if compat:  # edit region zeroed in both, LPIPS of the whole frame
        return float(lpips_map(net, output * keep, source * keep).mean())
    return masked_mean(lpips_map(net, output, source).double(), keep.double())
