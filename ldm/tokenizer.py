"""CLIP byte-level BPE tokenization as Stable Diffusion feeds its text encoder.

The vocabulary and merges are open_clip's (the same 49408-entry BPE as OpenAI CLIP). A prompt becomes
``[BOS] t_1 … t_n [EOS] pad …`` with n ≤ 75: the prompt is cut to 75 tokens *before* the start and end
tokens are added, so a long prompt keeps its end token (docs/checkpoints.md §7.3). Padding is the end token for
SD 1.x and 0 for SD 2.x (docs/checkpoints.md §7.3).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

BOS, EOS = 49406, 49407


@functools.lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer  # imported lazily: open_clip's import is slow

    return SimpleTokenizer()


class Tokenizer:
    def __init__(self, pad_token_id: int = EOS, max_length: int = 77):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens and without truncation."""
        return _bpe().encode(text)

    def decode(self, ids: list[int]) -> str:
        return _bpe().decode([i for i in ids if i not in (BOS, EOS)])

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """prompts -> ids [B, max_length] (long)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        room = self.max_length - 2
        rows = []
        for prompt in prompts:
            tokens = self.encode(prompt)
            if len(tokens) > room:
                log.warning("prompt is %d tokens long; CLIP sees %d, so this end was dropped: %r",
                            len(tokens), room, self.decode(tokens[room:]).strip())
                tokens = tokens[:room]
            ids = [BOS] + tokens + [EOS]
            rows.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def word_positions(self, prompt: str) -> list[tuple[str, list[int]]]:
        """Each whitespace-separated word of ``prompt`` with the positions (1-based, after BOS) of its BPE
        tokens in the encoded sequence. Words cut by truncation get the positions that survived."""
        result, position = [], 1
        for word in prompt.split():
            n = len(self.encode(word))
            kept = [p for p in range(position, position + n) if p <= self.max_length - 2]
            result.append((word, kept))
            position += n
        return result
