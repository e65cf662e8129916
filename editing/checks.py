"""The checks every command makes before any work: what the weights are against what the command needs, the
device, the thread count, the output path, the image size (with an estimate of its memory) and the prompts.

Each failed check is a ``UserError``: one line that names the problem and the fix. ``editing.cli.main`` runs
``check_before_work`` on the parsed options before it calls the command, so that a wrong input is reported
in a second, not after the model has loaded or after minutes of sampling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ldm.config import ModelConfig

from .errors import UserError

# What a weights file is -> (description, the command and option that use it). ``text-to-image`` and
# ``editor`` are the two kinds of whole model; the others are add-ons passed with their own option.
KINDS = {
    "text-to-image": ("a text-to-image model (4-channel UNet)",
                      "editlab generate, sdedit, p2p, ddpm-edit, controlnet, style or textual-inversion"),
    "editor": ("an InstructPix2Pix editor (8-channel UNet)", "editlab ip2p or editlab visii"),
    "controlnet": ("an editlab ControlNet", "editlab controlnet --control FILE"),
    "ip-adapter": ("an IP-Adapter", "editlab style --ip-adapter FILE"),
    "embedding": ("a textual-inversion embedding", "--embedding FILE with any command that reads a prompt"),
    "clip": ("an open_clip CLIP model", "editlab visii --clip FILE or editlab make-pairs --clip FILE"),
    "checkpoint": ("a Stable Diffusion checkpoint to convert", "--weights (converted in memory) or editlab convert"),
}
NEEDS = {  # what a command's --weights may be
    "text-to-image": ("text-to-image",),
    "editor": ("editor",),
    "any-model": ("text-to-image", "editor"),
}


def _safetensors_header(path: Path) -> tuple[dict, list[str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception:
        return {}, []


def weights_kind(path: Path) -> tuple[str, ModelConfig | None]:
    """(kind, config) of a weights file or folder from its metadata and key names (no tensor is read).
    Kind is one of KINDS, or "unknown"."""
    path = Path(path)
    if path.is_dir():
        return ("checkpoint", None) if (path / "model_index.json").is_file() else ("unknown", None)
    if path.suffix != ".safetensors":  # .ckpt / .pt / .bin: pickles, read only by the converter
        return "checkpoint", None
    metadata, keys = _safetensors_header(path)
    if metadata.get("format") == "editlab" and "config" in metadata:
        config = ModelConfig.from_json(metadata["config"])
        editor = config.unet.in_channels == 2 * config.vae.latent_channels
        return ("editor" if editor else "text-to-image"), config
    if metadata.get("format") == "editlab-controlnet":
        return "controlnet", None
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        return "ip-adapter", None
    if any(k.startswith(("string_to_param", "emb_params", "clip_l", "clip_g")) for k in keys) or len(keys) == 1:
        return "embedding", None
    if any(k.startswith("visual.") for k in keys) and "positional_embedding" in keys:
        return "clip", None
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        return "checkpoint", None
    return "unknown", None


def native_side(config: ModelConfig) -> int:
    """Default image side: 512 for SD 1.x/2.x, 1024 for SDXL, the training size for the toy model."""
    return {"toy": 64, "sdxl": 1024, "sdxl-refiner": 1024}.get(config.family, 512)


def check_weights(path: Path, needs: str, command: str) -> ModelConfig | None:
    """Refuse weights of the wrong kind for ``command``, naming what they are and where they belong."""
    kind, config = weights_kind(path)
    wanted = NEEDS[needs]
    if kind in wanted or kind in ("checkpoint", "unknown"):  # checkpoints are converted (and checked) on load
        return config
    what, use = KINDS[kind]
    need = " or ".join(KINDS[k][0] for k in wanted)
    raise UserError(f"--weights {path} is {what}; 'editlab {command}' needs {need}. Use it with {use}")


def check_converted(config: ModelConfig, path: Path, needs: str, command: str) -> None:
    """The same check for a model converted in memory (diffusers folder, original single file)."""
    kind = "editor" if config.unet.in_channels == 2 * config.vae.latent_channels else "text-to-image"
    if kind not in NEEDS[needs]:
        raise UserError(f"--weights {path} is {KINDS[kind][0]}; 'editlab {command}' needs "
                        f"{' or '.join(KINDS[k][0] for k in NEEDS[needs])}. Use it with {KINDS[kind][1]}")


def check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: unknown device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                            f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: editlab runs on cpu, cuda or mps")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """Half of the usable cores (1 on a 2-core machine): torch's default (every core) slows down several-fold
    as soon as another job takes a core, while half of them loses little on a quiet machine. Fixed per
    machine, so that a rerun gives the same pixels (they can depend on the thread count)."""
    return max(1, usable_cores() // 2)


def check_output_path(out: Path, folder: bool) -> None:
    """``out`` can be written: a folder (``folder``) or a file whose folder exists or can be made, and no
    part of the way is a file; checked before any work."""
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; the output is a folder: choose a new name")
    if not folder and out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name, e.g. {out / ('out' + (out.suffix or '.png'))}")
    existing = out if folder and out.is_dir() else out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder {existing} is not writable; choose another --out")


def check_sizes(args) -> None:
    for option in ("height", "width", "size", "resolution"):
        value = getattr(args, option, None)
        if value is not None and value <= 0:
            raise UserError(f"--{option} {value}: give a positive number of pixels (or leave it out for the "
                            "model's native size)")


def available_memory(device: str) -> int:
    """Bytes the device can still give: free GPU memory, or MemAvailable of /proc/meminfo on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def estimate_memory(config: ModelConfig, height: int, width: int, batch: int) -> int:
    """Bytes of activations that sampling ``batch`` images of ``height`` x ``width`` needs in fp32, beyond the
    weights. Attention runs on scaled_dot_product_attention's memory-efficient kernels (no tokens² score
    matrix), so the memory grows linearly with the pixels: the VAE decoder's full-resolution levels hold about
    six maps of its first level's width, the UNet (guided: 2·batch rows) about twenty of its first level's.
    Calibrated on the toy model (64 px wide, 1024 to 4096 px high: 640 bytes a pixel measured, 704 estimated)."""
    factor = config.vae.downsample_factor
    decoder = 6 * batch * config.vae.block_channels[0] * height * width * 4
    unet = 20 * 2 * batch * config.unet.model_channels * (height // factor) * (width // factor) * 4
    return decoder + unet


def check_memory(config: ModelConfig, height: int, width: int, batch: int, device: str) -> None:
    need, have = estimate_memory(config, height, width, batch), available_memory(device)
    if need > have:
        raise UserError(f"{width}x{height} pixels x batch {batch} needs at least {need / 2**30:.1f} GiB on {device}, "
                        f"{(need - have) / 2**30:.1f} GiB more than the {have / 2**30:.1f} GiB available; choose a "
                        "smaller --width/--height or batch")


PLACEHOLDER = re.compile(r"<[^<>\s]+>")


def check_placeholders(prompts: dict[str, str], known: set[str]) -> None:
    """A ``<token>``-looking word that no loaded embedding defines is an error (CLIP would silently read
    it as ordinary BPE pieces)."""
    for option, prompt in prompts.items():
        for word in PLACEHOLDER.findall(prompt):
            if word not in known:
                have = f"loaded: {', '.join(sorted(known))}" if known else "no embedding is loaded"
                raise UserError(f"{option}: {word} is not a known token ({have}); load its embedding with "
                                f"--embedding FILE")
