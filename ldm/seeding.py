"""Seeds derived from several integers (a run's seed and an item's index, a step, a stream), so that every draw
depends only on those numbers and never on the order, batch or process in which items are made."""

import numpy as np


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys``: numpy's SeedSequence mixes them (neighbouring keys give
    unrelated seeds), and the top bit is dropped so that ``torch.Generator.manual_seed`` takes it."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1  # shifted as a Python int: numpy < 2 refuses uint64 >> int64
