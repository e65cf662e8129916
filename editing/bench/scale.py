"""Memory at scale, each run in a fresh process (editing/bench/memory.py measures its peak resident set).

stream: peak resident memory of reading one epoch of N packed InstructPix2Pix pairs of 512 px from WebDataset
shards through ldm.stream (batch 4, the index built first), for two N. Streaming holds the index and one batch,
so the two peaks should match; loading the data whole (what train-ip2p did before) would hold N × 2 images of
512² × 3 fp32 (6.3 MB per pair), printed beside for scale.

checkpointing: peak resident memory and time of one forward + backward of a UNet with and without gradient
checkpointing, and the largest gradient difference. The default is the toy UNet at 64² latents, batch 8, where
activations dominate as they do for SD 1.5 at 64² (the SD 1.5 weights and gradients alone need 7 GB, more
than a shared CPU machine spares; ``--preset sd15 --size 32`` runs it where memory allows).
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np

from .memory import resident_peak


def _pack(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    from ldm.shards import shard_name, write_shard

    rng = np.random.default_rng(0)
    pictures = []
    for k in range(8):  # smooth gradients with a little noise: PNGs of realistic size for synthetic data
        y, x = np.mgrid[0:size, 0:size] / size
        array = np.stack([x * 255, y * 255, (x + y) * 127], -1) + rng.normal(0, 8, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
        pictures.append(buffer.getvalue())
    samples = ((f"{i:09d}", {"before.png": pictures[i % 8], "after.png": pictures[(i + 1) % 8],
                             "txt": f"edit {i}".encode()}) for i in range(n))
    for shard in range(0, n, 500):
        write_shard(folder / shard_name("data", shard // 500), [next(samples) for _ in range(min(500, n - shard))])


def _stream_setup(folder: str, size: int):
    from editing.instruct_pix2pix.data import PairShards
    from ldm.stream import StreamLoader

    pairs = PairShards(folder, size)
    loader = StreamLoader(pairs, 4, seed=0)

    def run():
        for step in range(-(-len(pairs) // 4)):
            loader.batch(step)

    return run


def run_stream(counts: tuple[int, ...] = (100, 2000), size: int = 512) -> str:
    lines = ["| samples | shards on disk | peak resident MiB | working MiB | whole data in memory (computed) MiB |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            folder = Path(tmp) / str(n)
            folder.mkdir()
            _pack(folder, n, size)
            disk = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            start = time.perf_counter()
            peak = resident_peak(f"stream {n}", _stream_setup, (str(folder), size), 1)
            whole = n * 2 * 3 * size * size * 4 / 2**20
            lines.append(f"| {n} | {disk:.0f} MiB | {peak.peak_bytes / 2**20:.0f} | {peak.working_bytes / 2**20:.0f} "
                         f"| {whole:.0f} |  ({time.perf_counter() - start:.0f} s)")
    return "\n".join(lines)


def _unet_setup(preset: str, latent: int, batch: int, checkpointing: bool):
    import torch

    from ldm.config import PRESETS
    from ldm.training import enable_gradient_checkpointing
    from ldm.unet import UNet

    torch.manual_seed(0)
    cfg = PRESETS[preset]().unet
    unet = UNet(cfg).train()
    if checkpointing:
        enable_gradient_checkpointing(unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    context = torch.randn(batch, 77, cfg.context_dim, generator=g)

    def run():
        start = time.perf_counter()
        unet(x, torch.full((batch,), 500), context).square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
        torch.save({"grads": grads, "seconds": time.perf_counter() - start},
                   f"/tmp/editlab-bench-ckpt-{checkpointing}.pt")

    return run


def run_checkpointing(preset: str = "toy", latent: int = 64, batch: int = 8, threads: int = 1) -> str:
    import torch

    rows, grads = [], {}
    for checkpointing in (False, True):
        peak = resident_peak(f"checkpointing={checkpointing}", _unet_setup, (preset, latent, batch, checkpointing),
                             threads)
        result = torch.load(f"/tmp/editlab-bench-ckpt-{checkpointing}.pt", weights_only=True)
        Path(f"/tmp/editlab-bench-ckpt-{checkpointing}.pt").unlink()
        grads[checkpointing] = result["grads"]
        rows.append(f"| {'on' if checkpointing else 'off'} | {peak.peak_bytes / 2**20:.0f} | "
                    f"{peak.working_bytes / 2**20:.0f} | {result['seconds']:.1f} |")
    difference = (grads[True] - grads[False]).abs().max().item()
    return "\n".join([f"{preset} UNet, batch {batch}, {latent}x{latent} latents, one forward + backward, "
                      f"{threads} threads",
                      "| gradient checkpointing | peak resident MiB | working MiB | seconds |", "|---|---|---|---|",
                      *rows, f"largest gradient difference: {difference:.2e}"])
