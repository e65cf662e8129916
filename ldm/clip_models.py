"""CLIP (*Learning Transferable Visual Models From Natural Language Supervision*, Radford et al., 2021) as the
editing methods use it: an open_clip model read from a local weights file, and its image and text embeddings.

- ``load_clip``: an open_clip ``CLIP`` with the weights of a local .safetensors (or a .pt read with
  weights_only); without a config, the shape of ViT-L/14 with QuickGELU (the OpenAI weights); with one, the
  JSON open_clip config (embed_dim, vision_cfg, text_cfg, quick_gelu) of any other CLIP. The bundled toy CLIP
  (ldm/toy/weights/toy-clip.safetensors, ldm/toy/clip.py) names its text tower in its metadata and loads
  through ``ldm.toy.clip.load_toy_clip``.
- ``clip_image_features``: images in [0, 1] -> resized (bicubic, antialiased) to the tower's input size,
  normalised x' = (x − μ) / σ with the OpenAI statistics, -> pooled + projected embeddings [B, D].
- ``clip_text_features``: captions -> open_clip's BPE tokens (cut to the context length) -> the EOS-pooled,
  projected embeddings [B, D].

Embeddings are returned unnormalised; callers normalise where their formula does.
Used by Visii (inversion/visii.py) and the InstructPix2Pix data filters (editing/instruct_pix2pix/pairs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.model import metadata_of

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP image normalisation (open_clip.constants)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(path: Path, config: Path | None, text_tower: bool = False):
    """An open_clip CLIP model with the weights of ``path`` (safetensors, or a .pt read with weights_only).
    The image tower and the text projection must be in the file; the rest of the text tower too when
    ``text_tower`` (captions are encoded: the make-pairs filters, the PEZ search), never left random."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CLIP weights file")
    if config is None and path.suffix == ".safetensors" and "text_tower" in metadata_of(path):
        from ldm.toy.clip import load_toy_clip  # the toy CLIP: its text tower is the toy model's text encoder

        return load_toy_clip(path)
    if config is not None:
        config = Path(config)
        if not config.is_file():
            raise FileNotFoundError(f"{config}: no such CLIP config file (a JSON open_clip model config)")
        model = open_clip.model.CLIP(**json.loads(config.read_text()))
    else:
        model = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # shapes that do not fit: another CLIP than the config describes
        width = state.get("visual.conv1.weight", torch.empty(0)).shape[:1]
        raise ValueError(f"{path}: its shapes do not fit {'--clip-config ' + str(config) if config else 'CLIP ViT-L/14'} "
                         f"(image tower width {tuple(width)[0] if width else '?'}); pass --clip-config with the "
                         "model's JSON open_clip config") from None
    needed = [k for k in missing if text_tower or k.startswith("visual.") or k == "text_projection"]
    if needed:
        raise ValueError(f"{path}: not an open_clip CLIP state dict fitting the config (missing {needed[:3]}); "
                         "pass CLIP ViT-L/14 weights or the matching --clip-config")
    return model.eval().requires_grad_(False)


def clip_image_features(clip_model, images: torch.Tensor) -> torch.Tensor:
    """open_clip image embeddings (pooled + projection) of images [B, 3, H, W] in [0, 1] -> [B, D]."""
    size = clip_model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (OPENAI_MEAN, OPENAI_STD))
    return clip_model.encode_image(((x.clamp(0, 1) - mean) / std).to(next(clip_model.parameters()).device))


def clip_text_features(clip_model, texts: list[str]) -> torch.Tensor:
    """open_clip text embeddings (EOS pooling + projection) of ``texts`` -> [B, D]; longer texts are cut."""
    import open_clip

    tokens = open_clip.tokenize(list(texts), context_length=clip_model.context_length)  # [B, L]
    return clip_model.encode_text(tokens.to(next(clip_model.parameters()).device))
