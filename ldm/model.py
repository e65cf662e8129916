"""A whole Stable Diffusion model (UNet, VAE, text encoder, tokenizer) and editlab's weight format.

editlab's format is one safetensors file: the state dict of ``StableDiffusion`` (keys ``unet.*``, ``vae.*``,
``text_encoder.*``, named as diffusers / transformers name them) with the ``ModelConfig`` as JSON in the
metadata. ``weights_convert`` turns every other layout into it; ``StableDiffusion.load`` reads it back.

A fine-tuned UNet (InstructPix2Pix, say) can be stored alone: the file then names a ``base`` editlab file in
its own folder (metadata ``vae_text_encoder_file``, with that file's SHA-256), and loading takes the VAE and
text encoder from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .clip import CLIPTextModel
from .config import ModelConfig
from .files import file_sha256
from .safetensors_io import SafetensorsError, read_header, read_tensors, write_tensors
from .schedulers.from_config import scheduler_config_json, standard_scheduler_config
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import AutoencoderKL

FORMAT = "editlab"
FORMAT_VERSION = "1"


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file, the problem and the fix."""


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.text_encoder = CLIPTextModel(config.text)
        self.tokenizer = Tokenizer(config.text.pad_token_id, config.text.max_length)
        if config.text_2 is not None:  # SDXL: OpenCLIP ViT-bigG beside CLIP-L (ldm/sdxl.py reads both)
            self.text_encoder_2 = CLIPTextModel(config.text_2)
            self.tokenizer_2 = Tokenizer(config.text_2.pad_token_id, config.text_2.max_length)
        # the noise schedule the weights were trained with (metadata "scheduler_config", see
        # ldm.schedulers.from_config); SD's standard one unless the file carries its folder's config
        self.scheduler_config = standard_scheduler_config(config.prediction_type)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def is_sdxl(self) -> bool:
        return self.config.unet.addition_embed == "text_time"

    @property
    def is_sdxl_refiner(self) -> bool:
        """SDXL's refiner: bigG alone (as ``text_encoder``), an aesthetic score instead of the target size."""
        return self.is_sdxl and self.config.text_2 is None

    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Text hidden states [B, 77, width] for the UNet's cross-attention (SDXL: ldm.sdxl.encode_prompt)."""
        if self.is_sdxl:
            from .sdxl import encode_prompt  # the context alone; SDXL's UNet also needs the pooled embedding

            return encode_prompt(self, prompts)[0]
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids)

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None,
             base: str | Path | None = None) -> None:
        """Write the editlab file; with ``base`` (an editlab file in the same folder whose VAE and text
        encoder this model shares), write only the UNet and a reference to ``base``."""
        metadata = {"format_version": FORMAT_VERSION, "scheduler_config": scheduler_config_json(self.scheduler_config),
                    **(extra_metadata or {})}
        if base is None:
            return save_weights(path, self, FORMAT, self.config.to_json(), metadata)
        base = Path(base)
        if base.resolve().parent != Path(path).resolve().parent:
            raise ValueError(f"base {base} must be in the folder of {path} (it is referenced by name)")
        _, base_tensors = read_editlab_file(base)
        for name, tensor in self.state_dict().items():
            if not name.startswith("unet.") and not torch.equal(tensor.cpu(), base_tensors[name].to(tensor.dtype)):
                raise ValueError(f"{name} differs from {base}: only the UNet may differ from the base file")
        metadata.update(vae_text_encoder_file=base.name, vae_text_encoder_sha256=file_sha256(base))
        save_weights(path, self.unet, FORMAT, self.config.to_json(), metadata, prefix="unet.")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "StableDiffusion":
        """Load an editlab weights file (made by ``editlab convert``). ``dtype`` applies to the UNet and the
        text encoders; the VAE stays in fp32 (SD's and SDXL's decoders overflow in fp16: black images) unless
        its config says it was fine-tuned for fp16 (``force_upcast`` false).

        Memory: the model is built on the meta device and takes the tensors as read (each read straight into
        its own memory, cast on the way), so the weights are held once."""
        def dtype_for(name: str) -> torch.dtype:
            if name.startswith("vae.") and config.vae.force_upcast:
                return torch.float32  # also when the file stores it in fp16
            return dtype or torch.float32  # a file saved in fp16 (--half) still loads as an fp32 model by default

        metadata = read_weights_metadata(path, FORMAT, "editlab model")
        config = ModelConfig.from_json(metadata["config"])
        config, tensors = read_editlab_file(path, dtype_for)
        with torch.device("meta"):
            model = cls(config)
        load_strict(model, tensors, path, assign=True)
        del tensors  # the model holds the only references now: channels_last below converts one at a time
        if "scheduler_config" in metadata:
            model.scheduler_config = json.loads(metadata["scheduler_config"])
        model.to(device)
        model.unet.use_channels_last().fuse_projections()
        return model.eval()


def read_editlab_file(path: str | Path, dtype_for=None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an editlab file; a UNet-only file gets its VAE and text encoder from its base.
    ``dtype_for(name)``: the dtype to read a floating tensor into (None keeps the file's)."""
    metadata, tensors = read_weights(path, FORMAT, "editlab model", dtype_for)
    if "vae_text_encoder_file" in metadata:
        base, sha256 = Path(path).parent / metadata["vae_text_encoder_file"], metadata["vae_text_encoder_sha256"]
        if not base.is_file() or file_sha256(base) != sha256:
            raise WeightsError(f"{path} holds only a UNet and needs its base file {base} exactly as it was "
                               f"saved (SHA-256 {sha256[:12]}…); put that file beside it")
        _, base_tensors = read_editlab_file(base, dtype_for)
        tensors = {**{k: v for k, v in base_tensors.items() if not k.startswith("unet.")}, **tensors}
    return ModelConfig.from_json(metadata["config"]), tensors


def save_weights(path: str | Path, module: nn.Module, format: str, config_json: str,
                 extra_metadata: dict[str, str] | None = None, prefix: str = "") -> None:
    """An editlab weights file: the module's state dict (names prefixed by ``prefix``) as safetensors, with
    ``format`` and the config JSON in the metadata, written atomically."""
    write_weights(path, ((prefix + k, v) for k, v in module.state_dict().items()), format, config_json, extra_metadata)


def write_weights(path: str | Path, tensors, format: str, config_json: str,
                  extra_metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """``save_weights`` for (name, tensor) pairs, written one at a time (floating ones cast to ``dtype``)."""
    metadata = {**(extra_metadata or {}), "format": format, "config": config_json}
    write_tensors(path, tensors, metadata, dtype)


def read_weights_metadata(path: str | Path, format: str, what: str) -> dict[str, str]:
    """The metadata of an editlab weights file of the given ``format`` (checked as ``read_weights`` does)."""
    return read_weights(path, format, what, header_only=True)[0]


def read_weights(path: str | Path, format: str, what: str, dtype_for=None,
                 header_only: bool = False) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of an editlab weights file of the given ``format``; a one-line WeightsError for a
    missing, unreadable or foreign file. ``dtype_for(name)`` casts floating tensors as they are read."""
    path = Path(path)
    fix = "convert it first with 'editlab convert SRC DST'"
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; pass the .safetensors {what} file written by 'editlab convert'")
    try:
        metadata = read_header(path)[0]
        if metadata.get("format") == format and not header_only:
            metadata, tensors = read_tensors(path, dtype_for)
        else:
            tensors = {}
    except (SafetensorsError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err}); {fix}") from None
    if metadata.get("format") != format or "config" not in metadata:
        raise WeightsError(f"{path}: a safetensors file but not an {what} file (format "
                           f"{metadata.get('format')!r}, expected {format!r}); {fix}")
    return metadata, tensors


def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], source, assign: bool = False) -> None:
    """Copy every tensor into ``module`` (``assign``: make the tensors the module's parameters, for a module
    built on the meta device); any missing, unexpected or wrongly shaped key is an error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or misshapen:
        def show(keys):
            return f"{len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
        raise WeightsError(f"{source}: weights do not fit the model: missing {show(missing)}, unexpected "
                           f"{show(unexpected)}, wrong shape {show(misshapen)}; was it converted for this model type?")
    module.load_state_dict(tensors, strict=True, assign=assign)


def metadata_of(path: str | Path) -> dict[str, str]:
    return read_header(path)[0]
