"""Streaming training data: each step reads only its own samples, in an order fixed by the seed.

A *source* is any map-style dataset (``len`` and ``source[i]`` -> one sample dict): a folder read file by
file, WebDataset shards read by offset (ldm/shards.py), or samples rendered on demand (the toy world). The
source holds an index of where samples are, never the samples, so memory does not grow with the data.

Order. The stream is the endless concatenation of epochs; epoch e is the permutation π_e = randperm(N) drawn
from ``step_generator(seed, e, stream=DATA_STREAM)``. Stream position g is sample π_{⌊g/N⌋}(g mod N).
Step s of a run with global batch G (= batch × processes × accumulation) reads positions [s·G, (s+1)·G); the
part k·P + r of that step (micro-step k on rank r, ldm.training.Part) reads its ``batch`` positions. So:

- every sample is read exactly once per epoch, across all ranks and dataloader workers together;
- the order depends only on (seed, N), not on the number of processes or workers: P processes with batch b
  read exactly what one process with batch P·b reads;
- the data position of a run is its step (the checkpoint holds it), so a resumed run reads the batches an
  uninterrupted one reads, on any number of processes with the same G.

Within a process, ``StreamLoader`` hands whole parts to ``torch.utils.data.DataLoader`` workers (each part is
read by one worker, in turn), so reading and decoding overlap training.

Bad data. A sample whose bytes cannot be decoded (a corrupt image in a shard, a missing file in a folder)
raises ``CorruptSample`` in the source; the stream logs a warning naming it, counts it, and reads the next
position's sample in its place (the batch keeps its size, every process still agrees on the order).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .shards import SampleRef, ShardIndex, read_parts
from .training import Part, step_generator, world

log = logging.getLogger(__name__)

DATA_STREAM = 2  # step_generator stream of the epoch permutations (0: the steps' draws)


class CorruptSample(Exception):
    """A sample that cannot be decoded; the message names it."""


def decode_sample(index: ShardIndex, ref: SampleRef, decode: Callable[[dict[str, bytes]], dict]) -> dict:
    """``decode`` applied to the parts of one sample read from its shard; a part that cannot be read or decoded
    makes the whole sample a CorruptSample (the loader replaces it, see the module docstring)."""
    try:
        return decode(read_parts(index, ref))
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as err:
        raise CorruptSample(f"{index.name(ref)}: {err}") from None


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """π_e: the permutation of 0 … n−1 read in epoch ``epoch``."""
    return torch.randperm(n, generator=step_generator(seed, epoch, stream=DATA_STREAM))


class PositionReader(Dataset):
    """Stream position -> sample (module docstring), with a corrupt sample replaced by the next position's."""

    def __init__(self, source, seed: int):
        if len(source) < 1:
            raise ValueError("the data holds no samples")
        self.source, self.seed, self._epoch, self._order = source, seed, None, None

    def __len__(self) -> int:
        return len(self.source)

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.source))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(len(self.source), self.seed, epoch)
        return int(self._order[offset])

    def __getitem__(self, position: int) -> dict:
        skipped = []
        for attempt in range(len(self.source)):
            index = self.index_at(position + attempt)
            try:
                sample = self.source[index]
            except CorruptSample as err:
                log.warning("skipped a corrupt sample: %s", err)
                skipped.append(str(err))
                continue
            worker = get_worker_info()
            return {**sample, "_index": index, "_position": position, "_skipped": skipped,
                    "_worker": worker.id if worker is not None else -1}
        raise ValueError(f"no sample of the data could be read ({len(skipped)} corrupt); check the data")


def collate(items: list[dict]) -> dict:
    """Samples -> one dict: tensors stacked ([B, ...]), everything else in lists."""
    return {key: torch.stack([i[key] for i in items]) if isinstance(items[0][key], torch.Tensor)
            else [i[key] for i in items] for key in items[0]}


class StreamLoader:
    """The batches of a run: ``batch(step, part)`` -> the collated samples of that part of that step.

    Parts are expected in the order the Trainer asks for them (step by step, micro-step by micro-step, this
    rank's parts only); any other request (a resumed run's first step) restarts the reading there.
    ``skipped`` lists the corrupt samples this process met (replaced, see module docstring).
    """

    def __init__(self, source, batch: int, seed: int, accumulate: int = 1, workers: int = 0,
                 rank_and_size: tuple[int, int] | None = None):
        if batch < 1 or accumulate < 1 or workers < 0:
            raise ValueError(f"need batch >= 1, accumulate >= 1, workers >= 0; got {batch}, {accumulate}, {workers}")
        self.reader = PositionReader(source, seed)
        self.batch_size, self.accumulate, self.workers = batch, accumulate, workers
        self.rank, self.size = rank_and_size or world()
        self.skipped: list[str] = []
        self._iterator, self._next = None, None

    def positions(self, step: int, part: Part) -> range:
        """Stream positions of ``part`` of ``step``: [s·G + k·b, s·G + (k+1)·b) with G = b·count."""
        start = step * self.batch_size * part.count + part.index * self.batch_size
        return range(start, start + self.batch_size)

    def _following(self, step: int, index: int) -> tuple[int, int]:
        """The part this process reads after part ``index`` of ``step``."""
        return (step, index + self.size) if index // self.size + 1 < self.accumulate else (step + 1, self.rank)

    def _schedule(self, step: int, index: int):
        count = self.size * self.accumulate
        while True:
            yield list(self.positions(step, Part(index, count)))
            step, index = self._following(step, index)

    def batch(self, step: int, part: Part | None = None) -> dict:
        part = part or Part(self.rank, self.size * self.accumulate)
        if part.count != self.size * self.accumulate or part.index % self.size != self.rank:
            raise ValueError(f"part {part.index} of {part.count} is not one of rank {self.rank}'s "
                             f"({self.size} processes × {self.accumulate} micro-steps)")
        if (step, part.index) != self._next:  # the first request, or a jump (resume): read from there
            self.close()
            loader = DataLoader(self.reader, batch_sampler=self._schedule(step, part.index),
                                num_workers=self.workers, collate_fn=collate)
            self._iterator = iter(loader)
        self._next = self._following(step, part.index)
        out = next(self._iterator)
        for names in out["_skipped"]:
            self.skipped += names
        return out

    def close(self) -> None:
        """Stop the reading workers (they also stop when the loader is dropped)."""
        self._iterator, self._next = None, None


def run_streaming(trainer, loader: StreamLoader, what: str, **run_options) -> list[float]:
    """``trainer.run(**run_options)`` reading from ``loader``; the loader's workers are stopped however the run
    ends, and the corrupt samples it skipped are reported once, at the end."""
    try:
        losses = trainer.run(**run_options)
    finally:
        loader.close()
    if loader.skipped:
        log.warning("%d corrupt %s were skipped (replaced by the next ones): %s", len(loader.skipped), what,
                    "; ".join(loader.skipped[:5]))
    return losses
