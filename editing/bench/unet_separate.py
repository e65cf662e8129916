"""bench unet --separate: editlab and diffusers UNets one at a time, each with its own copy of the weights.

For models whose two copies do not fit in memory together (the SDXL UNet is 10.3 GB in fp32), and to time
each model as its users load it. The weights travel the way a real checkpoint does:

1. diffusers' ``UNet2DConditionModel`` is built with seeded random weights and saved with ``save_pretrained``
   (a diffusers ``unet/`` folder: config.json and safetensors shards);
2. editlab converts that folder (``weights_convert``: config.json read field by field, every tensor renamed
   and checked strictly) and writes the converted UNet once;
3. in rounds, each contender runs in a freshly spawned process: diffusers loads the folder with
   ``from_pretrained``, editlab reads its converted file as ``StableDiffusion.load`` does (channels_last,
   fused projections); ``warmup`` forwards, then ``forwards`` timed ones, the kernel's resident high-water
   mark reset after loading (editing/bench/memory.py), and the output saved.

Rounds alternate the order (diffusers, editlab; editlab, diffusers; ...), so slow phases of a shared machine
fall on both; the ratio is the median over rounds of editlab's median / diffusers' median, in wall-clock and
in CPU seconds (the process's own CPU time, which waiting for a core shared with other jobs does not inflate). The outputs of
the first round are compared from disk.
"""

from __future__ import annotations

import multiprocessing
import statistics
from queue import Empty
import tempfile
import time
from pathlib import Path

import torch

from ldm.config import PRESETS

from . import machine_description
from .memory import CLEAR_REFS, _status_bytes
from .peers import diffusers_unet_config, require_peers
from .unet import fill_random, peer_call, unet_inputs

CONTENDERS = ("diffusers", "editlab")


def _write_diffusers_unet(preset: str, folder: str, seed: int) -> None:
    """Step 1, in its own process: a seeded random diffusers UNet saved as a diffusers ``unet/`` folder."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        peer = UNet2DConditionModel(**diffusers_unet_config(PRESETS[preset]().unet))
    peer = fill_random(peer.to_empty(device="cpu"), seed)
    peer.save_pretrained(folder, safe_serialization=True)


def _convert(preset: str, folder: str, converted: str) -> str:
    """Step 2, in its own process: the diffusers folder through editlab's converter, written as one file."""
    from ldm.model import write_weights
    from ldm.unet import UNet
    from weights_convert.diffusers_folder import convert_unet, read_component, unet_config_from_diffusers
    from weights_convert.files import read_json
    from weights_convert.report import assemble

    cfg = unet_config_from_diffusers(read_json(Path(folder) / "config.json"))
    if cfg != PRESETS[preset]().unet:
        raise RuntimeError(f"config.json read back as {cfg}, not the {preset} preset")
    with torch.device("meta"):
        target = UNet(cfg)
    tensors, report = assemble(convert_unet(read_component(Path(folder)), "unet/"), target, folder, {"layout": "diffusers"})
    write_weights(converted, tensors, "editlab-unet", "{}", {"preset": preset})
    return report.summary()


def _load(name: str, preset: str, folder: str, converted: str, dtype: torch.dtype):
    if name == "diffusers":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).eval()
    from ldm.model import load_strict
    from ldm.safetensors_io import read_tensors
    from ldm.unet import UNet

    _, tensors = read_tensors(converted, lambda _: dtype)  # each tensor read into its own memory, cast on the way
    with torch.device("meta"):
        model = UNet(PRESETS[preset]().unet)
    load_strict(model, tensors, converted, assign=True)
    del tensors
    return model.use_channels_last().fuse_projections().eval()  # as StableDiffusion.load runs it


def _contender(name: str, preset: str, folder: str, converted: str, batch: int, size: int, dtype: torch.dtype,
               threads: int, warmup: int, forwards: int, output: str) -> dict:
    """Step 3, in a fresh process: load, forward, report load time, times, resident set and its peak."""
    torch.set_num_threads(threads)
    if name == "diffusers":
        from diffusers import UNet2DConditionModel  # noqa: F401  (imported before the clock, as editlab's modules are)
    start = time.perf_counter()
    model = _load(name, preset, folder, converted, dtype)
    load_seconds = time.perf_counter() - start
    cfg = PRESETS[preset]().unet
    x, t, context, added = unet_inputs(cfg, batch, size, dtype, torch.device("cpu"))
    call = (lambda: peer_call(model, x, t, context, added)) if name == "diffusers" else \
        (lambda: model(x, t, context, added=added))
    before = _status_bytes("VmRSS")
    CLEAR_REFS.write_text("5")  # high-water mark <- the loaded model's resident set
    seconds, cpu_seconds = [], []
    with torch.inference_mode():
        for i in range(warmup + forwards):
            begin, begin_cpu = time.perf_counter(), time.process_time()
            out = call()
            if i >= warmup:
                seconds.append(time.perf_counter() - begin)
                cpu_seconds.append(time.process_time() - begin_cpu)
    torch.save(out.float().contiguous(), output)
    return dict(load=load_seconds, before=before, peak=_status_bytes("VmHWM"), seconds=seconds, cpu=cpu_seconds)


def _spawn(target, args: tuple, what: str):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_queued, args=(target, args, queue))
    process.start()
    while True:  # read before join (a large item would block the child's exit); a killed child sends nothing
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():
                result = RuntimeError(f"the process ended with exit code {process.exitcode} (killed for memory?)")
                break
    process.join()
    if isinstance(result, BaseException) or process.exitcode != 0:
        raise RuntimeError(f"bench unet --separate: {what} failed ({result!r})")
    return result


def _queued(target, args, queue) -> None:
    try:
        queue.put(target(*args))
    except BaseException as err:  # reported by the parent in one line
        queue.put(RuntimeError(f"{type(err).__name__}: {err}"))


def run(preset: str, batch: int, latent_size: int, dtype: torch.dtype, rounds: int, warmup: int, forwards: int,
        work: str | None = None, seed: int = 0) -> str:
    require_peers()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        folder, converted = str(Path(tmp) / "unet"), str(Path(tmp) / "unet.editlab.safetensors")
        start = time.perf_counter()
        _spawn(_write_diffusers_unet, (preset, folder, seed), "writing the diffusers UNet")
        written = time.perf_counter() - start
        summary = _spawn(_convert, (preset, folder, converted), "converting the diffusers folder")
        converted_s = time.perf_counter() - start - written
        results = {name: [] for name in CONTENDERS}
        for r in range(rounds):
            for name in (CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]):
                output = str(Path(tmp) / f"{name}-{r}.pt")
                args = (name, preset, folder, converted, batch, latent_size, dtype, threads, warmup, forwards, output)
                results[name].append(_spawn(_contender, args, f"the {name} round {r}"))
        ours = torch.load(str(Path(tmp) / "editlab-0.pt"), weights_only=True)
        theirs = torch.load(str(Path(tmp) / "diffusers-0.pt"), weights_only=True)
        difference = (ours - theirs).abs().max().item()
        relative = difference / theirs.abs().max().item()
    gib = 2.0 ** 30
    lines = [f"UNet forward, preset {preset}, one model at a time (each in a fresh process per round), batch {batch}, "
             f"latents {latent_size}x{latent_size}, {dtype}, cpu ({machine_description(torch.device('cpu'))}); "
             f"{rounds} rounds (order alternating) of {warmup} warm-up + {forwards} timed forwards",
             f"  weights: diffusers save_pretrained {written:.0f} s; editlab conversion {converted_s:.0f} s: "
             + summary.splitlines()[0],
             f"  max |editlab - diffusers| = {difference:.2e} ({relative:.1e} of max |diffusers|)",
             "  | contender | s per forward (median) | per round | CPU s per forward | load s | resident after load "
             "| peak resident |",
             "  |---|---|---|---|---|---|---|"]
    for name in CONTENDERS:
        runs = results[name]
        medians = [statistics.median(r["seconds"]) for r in runs]
        cpu = statistics.median(statistics.median(r["cpu"]) for r in runs)
        lines.append(f"  | {name} | {statistics.median(medians):.3f} | {', '.join(f'{m:.3f}' for m in medians)} | "
                     f"{cpu:.3f} | "
                     f"{statistics.median(r['load'] for r in runs):.0f} | "
                     f"{max(r['before'] for r in runs) / gib:.2f} GiB | {max(r['peak'] for r in runs) / gib:.2f} GiB |")
    ratios = [statistics.median(e["seconds"]) / statistics.median(d["seconds"])
              for e, d in zip(results["editlab"], results["diffusers"])]
    cpu_ratios = [statistics.median(e["cpu"]) / statistics.median(d["cpu"])
                  for e, d in zip(results["editlab"], results["diffusers"])]
    lines.append(f"  ratio editlab/diffusers = {statistics.median(ratios):.3f} (median of per-round ratios "
                 f"{', '.join(f'{x:.3f}' for x in ratios)}); in CPU time {statistics.median(cpu_ratios):.3f} "
                 "(less sensitive to other jobs on the machine)")
    return "\n".join(lines)
