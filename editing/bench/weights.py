"""bench weights: peak resident memory of ``editlab convert`` and of loading the converted model, against the
size of the weights kept, at full size (e.g. SDXL base: 3.5 B parameters).

A random checkpoint of the preset's exact shapes is written in the original single-file layout (one tensor
at a time, so writing it needs no memory either), then, each in a fresh Python process,

    convert: editlab's weights_convert on that file (memory-mapped source, streamed output)
    load:    StableDiffusion.load of the converted file (read tensor by tensor into a meta-built model)

and each process reports its resident high-water mark (VmHWM, Linux). The ratio peak / weights-file size is
what the loader promises to keep near 1 (no second copy of the weights at any moment).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ldm.config import PRESETS, ModelConfig
from ldm.safetensors_io import write_produced

from . import machine_description

CHILD = """
import json, re, sys, time
from pathlib import Path
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
print(json.dumps({{"peak": hwm, "seconds": seconds}}))
"""

CONVERT = "from weights_convert import convert\nconvert({src!r}, {dst!r}, config=__import__('ldm.config', fromlist=['x']).PRESETS[{preset!r}]())"
LOAD = "from ldm.model import StableDiffusion\nmodel = StableDiffusion.load({dst!r})"


def original_layout_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an original SDXL single file (sgm layout) for ``cfg``, with its shape."""
    from .ldm_layout import ldm_unet_shapes, ldm_vae_shapes

    shapes = {"model.diffusion_model." + k: v for k, v in ldm_unet_shapes(cfg.unet).items()}
    shapes.update({"first_stage_model." + k: v for k, v in ldm_vae_shapes(cfg.vae).items()})
    t, p = cfg.text, "conditioner.embedders.0.transformer.text_model."
    shapes.update({p + "embeddings.token_embedding.weight": (t.vocab_size, t.width),
                   p + "embeddings.position_embedding.weight": (t.max_length, t.width),
                   p + "final_layer_norm.weight": (t.width,), p + "final_layer_norm.bias": (t.width,)})
    for n in range(t.n_layers):
        b = f"{p}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{b}self_attn.{proj}.weight": (t.width, t.width), f"{b}self_attn.{proj}.bias": (t.width,)})
        shapes.update({b + "layer_norm1.weight": (t.width,), b + "layer_norm1.bias": (t.width,),
                       b + "layer_norm2.weight": (t.width,), b + "layer_norm2.bias": (t.width,),
                       b + "mlp.fc1.weight": (t.mlp_dim, t.width), b + "mlp.fc1.bias": (t.mlp_dim,),
                       b + "mlp.fc2.weight": (t.width, t.mlp_dim), b + "mlp.fc2.bias": (t.width,)})
    g, p = cfg.text_2, "conditioner.embedders.1.model."
    shapes.update({p + "token_embedding.weight": (g.vocab_size, g.width), p + "positional_embedding": (g.max_length, g.width),
                   p + "ln_final.weight": (g.width,), p + "ln_final.bias": (g.width,),
                   p + "text_projection": (g.width, g.projection_dim), p + "logit_scale": ()})
    for n in range(g.n_layers):
        b = f"{p}transformer.resblocks.{n}."
        shapes.update({b + "attn.in_proj_weight": (3 * g.width, g.width), b + "attn.in_proj_bias": (3 * g.width,),
                       b + "attn.out_proj.weight": (g.width, g.width), b + "attn.out_proj.bias": (g.width,),
                       b + "ln_1.weight": (g.width,), b + "ln_1.bias": (g.width,),
                       b + "ln_2.weight": (g.width,), b + "ln_2.bias": (g.width,),
                       b + "mlp.c_fc.weight": (g.mlp_dim, g.width), b + "mlp.c_fc.bias": (g.mlp_dim,),
                       b + "mlp.c_proj.weight": (g.width, g.mlp_dim), b + "mlp.c_proj.bias": (g.width,)})
    return shapes


def write_random_checkpoint(cfg: ModelConfig, path: Path, dtype: torch.dtype) -> int:
    """Write the file (values N(0, 0.02), generated one tensor at a time); returns its parameter count."""
    generator = torch.Generator().manual_seed(0)
    shapes = original_layout_shapes(cfg)
    write_produced(path, [(name, shape, dtype) for name, shape in shapes.items()],
                   lambda name: (torch.randn(shapes[name], generator=generator) * 0.02).to(dtype))
    return sum(torch.Size(s).numel() for s in shapes.values())


def _child(body: str) -> dict:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", CHILD.format(body=body)], capture_output=True, text=True,
                            cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    if result.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(preset: str, dtype: torch.dtype, work: Path | None = None) -> str:
    cfg = PRESETS[preset]()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        src, dst = Path(tmp) / "original.safetensors", Path(tmp) / "editlab.safetensors"
        params = write_random_checkpoint(cfg, src, dtype)
        convert = _child(CONVERT.format(src=str(src), dst=str(dst), preset=preset))
        load = _child(LOAD.format(dst=str(dst)))
        size = dst.stat().st_size
    gib = 2 ** 30
    lines = [f"weights memory, preset {preset}, {params / 1e9:.2f} B parameters in {dtype}, converted file "
             f"{size / gib:.2f} GiB ({machine_description(torch.device('cpu'))})"]
    for name, r in (("convert", convert), ("load", load)):
        lines.append(f"  {name:8s} peak resident {r['peak'] / gib:.2f} GiB = {r['peak'] / size:.3f}x the weights "
                     f"kept, {r['seconds']:.0f} s")
    return "\n".join(lines)
