"""Token alignment between a source prompt and its edits.

Paper: *Prompt-to-Prompt Image Editing with Cross Attention Control* (Hertz et al., ICLR 2023), §3.2; the
public code is google/prompt-to-prompt seq_aligner.py (docs/methods.md §1.3). Cross-attention maps are indexed by
token position, so an edit that keeps the source's maps needs, for every target token, its source token:

- word swap (Replace): both prompts have the same number of words; some differ. A mapper M [77, 77] with
      E[:, :, n] = Σ_w A_0[:, :, w] · M[w, n].
  Words of equal token count map one-to-one; a swapped word with source span S and target span T,
  |S| ≠ |T|, spreads: M[s, t] = 1/|T| for s ∈ S, t ∈ T. Every later token keeps the accumulated offset
  Σ(|T| − |S|) of the swaps before it (the public code drops that offset after the last swap: docs/methods.md
  §1.6 item 1), and target positions left without a source map to themselves.
- refinement (Refine): words are added (or removed). Needleman–Wunsch global alignment of the token ids,
  start and end tokens included, with match +1, mismatch −1, gap 0; m(n) = the source position aligned to
  target token n, or none (a new token).
- words -> token positions (equalizer, per-word schedules, blend words). A word must match a whitespace word
  of the prompt exactly ("burger." is not "burger"); a word that matches nothing is an error (the public
  code silently does nothing).
"""

from __future__ import annotations

import difflib
from typing import Mapping, Sequence

import torch

from ldm.tokenizer import BOS, EOS, Tokenizer


def token_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """[BOS] t_1 … t_n [EOS] as the text encoder sees it (cut to the context length), without padding."""
    return [BOS] + tokenizer.encode(prompt)[: tokenizer.max_length - 2] + [EOS]


def find_word(tokenizer: Tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt`` (empty when it does not occur)."""
    return [p for w, positions in tokenizer.word_positions(prompt) if w == word for p in positions]


def word_positions_in(tokenizer: Tokenizer, prompts: Sequence[str], word: str, what: str) -> list[list[int]]:
    """Positions of ``word`` in each prompt; a word found in none of them is a ValueError naming it."""
    found = [find_word(tokenizer, prompt, word) for prompt in prompts]
    if not any(found):
        words = sorted({w for prompt in prompts for w, _ in tokenizer.word_positions(prompt)})
        raise ValueError(f"{what} word {word!r} is not a word of {list(prompts)} (words: {words}); words must "
                         "match a whitespace-separated word exactly, punctuation included")
    return found


def replacement_mapper(tokenizer: Tokenizer, source: str, target: str) -> torch.Tensor:
    """Word-swap mapper M [L, L] (L = context length): M[i, j] is how much of source token i goes to target
    token j. Rows are source positions, columns target positions."""
    source_words, target_words = tokenizer.word_positions(source), tokenizer.word_positions(target)
    if len(source_words) != len(target_words):
        a, b = [w for w, _ in source_words], [w for w, _ in target_words]
        removed, added = [], []
        for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=a, b=b).get_opcodes():
            removed += a[i0:i1] if op in ("delete", "replace") else []
            added += b[j0:j1] if op in ("insert", "replace") else []
        raise ValueError(f"a word swap needs prompts with the same number of words: {source!r} has {len(a)}, "
                         f"{target!r} has {len(b)} (words only in the source: {removed}, only in the edit: "
                         f"{added}); use mode 'refine' to add or remove words")
    length = tokenizer.max_length
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0  # start token
    for (_, span_s), (_, span_t) in zip(source_words, target_words):
        if len(span_s) == len(span_t):
            mapper[span_s, span_t] = 1.0  # one-to-one (unchanged words, equal-length swaps)
        elif span_s and span_t:
            for t in span_t:
                mapper[span_s, t] = 1.0 / len(span_t)  # M[s, t] = 1/|T| for s ∈ S, t ∈ T
    # end token and padding: in lockstep after the last word, with the accumulated offset
    i = 1 + sum(len(span) for _, span in source_words)
    j = 1 + sum(len(span) for _, span in target_words)
    while i < length and j < length:
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    for j in range(j, length):  # the target is shorter: positions without a source keep their own
        mapper[j, j] = 1.0
    return mapper


def needleman_wunsch(x: Sequence, y: Sequence, match: int = 1, mismatch: int = -1, gap: int = 0) -> list[int]:
    """Global alignment of sequences x and y (*A general method applicable to the search for similarities in
    the amino acid sequence of two proteins*, Needleman & Wunsch, 1970). Returns, for every element of y, the
    index of the element of x aligned to it, or -1 where y has an insertion.

        S[i, j] = max(S[i, j−1] + gap,  S[i−1, j] + gap,  S[i−1, j−1] + (match if x_i = y_j else mismatch))

    Ties prefer the insertion into y (left), then the deletion from x (up), then the diagonal, as seq_aligner.
    """
    n, m = len(x), len(y)
    score = [[(i + j) * gap if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    move = [["left" if i == 0 else "up" for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1] + gap, score[i - 1][j] + gap
            diagonal = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i][j] = max(left, up, diagonal)
            move[i][j] = "left" if score[i][j] == left else "up" if score[i][j] == up else "diagonal"
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == "diagonal":
            i, j = i - 1, j - 1
            aligned[j] = i
        elif step == "left":
            j -= 1  # y[j] is new
        else:
            i -= 1  # x[i] has no counterpart in y
    return aligned


def refinement_mapper(tokenizer: Tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine alignment: (mapper [L] long, aligned [L] float). Target token n takes source token mapper[n]
    where aligned[n] = 1 and keeps its own map where aligned[n] = 0 (a new token). Positions past the target's
    end token map to themselves."""
    x, y = token_ids(tokenizer, source), token_ids(tokenizer, target)
    alignment = needleman_wunsch(x, y)
    if sum(1 for j, i in enumerate(alignment) if i >= 0 and y[j] not in (BOS, EOS)) == 0 and len(x) > 2:
        raise ValueError(f"cannot refine {source!r} into {target!r}: they share no word (words of the edit: "
                         f"{target.split()}); a refinement keeps the source's words and adds to them")
    length = tokenizer.max_length
    mapper, aligned = torch.arange(length), torch.ones(length)
    for j, i in enumerate(alignment):
        mapper[j] = i if i >= 0 else j
        aligned[j] = float(i >= 0)
    return mapper, aligned


def equalizer(tokenizer: Tokenizer, edited_prompts: Sequence[str], weights: Mapping[str, float]) -> torch.Tensor:
    """Reweighting factors e [B−1, L]: 1 everywhere, ``weights[word]`` on that word's tokens in each edited
    prompt that contains it (negative values allowed)."""
    scale = torch.ones(len(edited_prompts), tokenizer.max_length)
    for word, value in weights.items():
        for row, positions in enumerate(word_positions_in(tokenizer, edited_prompts, word, "reweight")):
            scale[row, positions] = float(value)
    return scale
