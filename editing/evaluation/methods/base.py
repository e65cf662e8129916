"""What every method adapter shares: its output, the "cannot run" signal, the lazily loaded networks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from editing.options import TOY_CLIP_WEIGHTS, TOY_IP2P_WEIGHTS, TOY_IP_ADAPTER_WEIGHTS, TOY_WEIGHTS


class CannotRun(Exception):
    """A method cannot run a case (no instruction, no ground-truth pair, no weights ...); the message says why
    and is recorded in the results row instead of metrics."""


@dataclass
class MethodOutput:
    image: torch.Tensor  # the edit [3, H, W] in [0, 1]
    reconstruction: torch.Tensor | None = None  # inversion methods: the source row, regenerated
    hint_edges: torch.Tensor | None = None  # ControlNet: the Canny edges (bool [H, W]) the output was conditioned on
    canny_config: object | None = None  # ControlNet: the CannyConfig that found them, to re-detect alike
    hint_mask: torch.Tensor | None = None  # ControlNet on the toy: the object mask (bool [H, W]) it was given
    style_image: torch.Tensor | None = None  # IP-Adapter / InstantStyle: the style reference
    notes: dict = field(default_factory=dict)  # anything the method reports (e.g. the Visii init text)


@dataclass
class Resources:
    """Weights the methods load on first use (each at most once per process)."""

    weights: Path | None = None  # SD model; None = the bundled toy model
    ip2p_weights: Path | None = None  # InstructPix2Pix model; None = the toy one
    clip: Path | None = None  # CLIP for Visii's loss (the metrics' CLIP)
    clip_config: Path | None = None
    controlnet: Path | None = None
    ip_adapter: Path | None = None
    image_encoder: Path | None = None
    device: str = "cpu"
    _cache: dict = field(default_factory=dict)

    def _load(self, key, loader):
        if key not in self._cache:
            self._cache[key] = loader()
        return self._cache[key]

    def model(self):
        from ldm.model import StableDiffusion

        path = self.weights or TOY_WEIGHTS
        return self._load(("sd", path), lambda: StableDiffusion.load(path, device=self.device))

    def ip2p_model(self):
        from ldm.model import StableDiffusion

        path = self.ip2p_weights or TOY_IP2P_WEIGHTS
        if not Path(path).is_file():
            raise CannotRun(f"needs InstructPix2Pix weights: {path} not found (--ip2p-weights FILE)")
        return self._load(("ip2p", path), lambda: StableDiffusion.load(path, device=self.device))

    def clip_model(self):
        from ldm.clip_models import load_clip

        if self.clip is None or not Path(self.clip).is_file():
            raise CannotRun(f"needs CLIP weights for its loss: {self.clip or '--clip FILE'} not found")
        return self._load(("clip", self.clip), lambda: load_clip(self.clip, self.clip_config).to(self.device))

    def controlnet_net(self):
        from controls.controlnet import ControlNet

        if self.controlnet is None or not Path(self.controlnet).is_file():
            raise CannotRun(f"needs a ControlNet for this base model: {self.controlnet or '--controlnet FILE'} "
                            "not found")
        return self._load(("controlnet", self.controlnet), lambda: ControlNet.load(self.controlnet, self.device))

    def adapter(self):
        """(IP-Adapter, its CLIP image encoder); on the toy model the bundled toy IP-Adapter and toy CLIP
        unless others are given (as ``editlab style``)."""
        from weights_convert.clip_vision import load_image_encoder
        from weights_convert.ip_adapter import load_ip_adapter

        toy = self.model().config.family == "toy"
        ip_adapter = self.ip_adapter or (TOY_IP_ADAPTER_WEIGHTS if toy else None)
        encoder_path = self.image_encoder or (TOY_CLIP_WEIGHTS if toy else None)
        for path, what in ((ip_adapter, "--ip-adapter FILE"), (encoder_path, "--image-encoder FILE")):
            if path is None or not Path(path).is_file():
                raise CannotRun(f"needs IP-Adapter weights and their image encoder: {path or what} not found")

        def load():
            adapter, _ = load_ip_adapter(ip_adapter, self.model().unet)
            encoder, _ = load_image_encoder(encoder_path)
            return adapter, encoder.to(self.device)

        return self._load(("ip-adapter", ip_adapter, encoder_path), load)


def image_size(model, case) -> tuple[int, int]:
    height, width = case.image.shape[-2:]
    factor = model.config.vae.downsample_factor
    if height % factor or width % factor:
        raise CannotRun(f"image {width}x{height} is not a multiple of {factor}")
    return height, width


def need_prompts(case) -> None:
    if not case.source_prompt or not case.target_prompt:
        raise CannotRun("the case has no source and target prompt")
