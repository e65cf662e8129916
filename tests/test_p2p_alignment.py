"""Prompt-to-Prompt token alignment and schedules: the word-swap mapper with unequal token counts (docs/methods.md
§1.6 item 1), Needleman–Wunsch refinement, word lookup errors, equalizer, cross/self schedules, map levels."""

import pytest
import torch

from editing.p2p.alignment import (equalizer, needleman_wunsch, refinement_mapper, replacement_mapper, token_ids,
                                   word_positions_in)
from editing.p2p.schedules import (calls_for, cross_replace_alphas, default_map_level, level_shape,
                                   self_replace_calls)
from ldm.config import sd15, tiny_sd1, toy
from ldm.tokenizer import EOS, Tokenizer
from ldm.unet import UNet

TOKENIZER = Tokenizer()
L = TOKENIZER.max_length


def padded_ids(prompt):
    return TOKENIZER(prompt)[0].tolist()


def one_to_one_pairs(mapper):
    """(source i, target j) of every entry equal to 1 (exact one-to-one transfers)."""
    return [tuple(p) for p in (mapper == 1).nonzero().tolist()]


def test_swap_to_more_tokens_maps_every_later_token_with_the_offset():
    source, target = "a cat on a mat", "a hippopotamus on a mat"
    assert [len(p) for _, p in TOKENIZER.word_positions(target)] == [1, 3, 1, 1, 1]  # the 1 -> 3 token swap
    mapper = replacement_mapper(TOKENIZER, source, target)
    eos_source, eos_target = len(token_ids(TOKENIZER, source)) - 1, len(token_ids(TOKENIZER, target)) - 1
    assert (eos_source, eos_target) == (6, 8)
    assert mapper[eos_source, eos_target] == 1 and mapper[eos_source].sum() == 1  # EOS -> EOS
    assert torch.equal(mapper[2, 2:5], torch.full((3,), 1 / 3))  # "cat" spreads over hippo/potam/us
    for i, j in [(0, 0), (1, 1), (3, 5), (4, 6), (5, 7)]:  # BOS, "a", "on", "a", "mat"
        assert mapper[i, j] == 1 and mapper[i].sum() == 1, (i, j)
    # the public code's bug writes the tail on the diagonal: target "on" (5) would receive source "mat" (5)
    assert mapper[5, 5] == 0 and mapper[6, 6] == 0
    # every exact transfer moves a token to the same token id (padding = EOS for SD 1)
    ids_s, ids_t = padded_ids(source), padded_ids(target)
    pairs = one_to_one_pairs(mapper)
    assert len(pairs) == L - 3  # all but "cat" and the two source pads pushed past the end
    assert all(ids_s[i] == ids_t[j] for i, j in pairs)
    assert all(j - i == 2 for i, j in pairs if i >= 3)  # accumulated offset |T| − |S| = 2


def test_swap_to_fewer_tokens_keeps_offset_and_fills_the_tail():
    source, target = "a hippopotamus on a mat", "a cat on a mat"
    mapper = replacement_mapper(TOKENIZER, source, target)
    assert torch.equal(mapper[2:5, 2], torch.ones(3))  # 3 source tokens -> 1 target token, 1/|T| = 1 each
    assert mapper[8, 6] == 1  # EOS -> EOS
    assert mapper[74, 72] == 1 and mapper[76, 74] == 1
    assert mapper[75, 75] == 1 and mapper[76, 76] == 1  # target 75, 76 have no source: themselves
    expected = torch.ones(L)
    expected[2] = 3.0  # "cat" receives hippo + potam + us; every other target exactly one source token
    assert torch.equal(mapper.sum(0), expected)


def test_identical_prompts_give_the_identity_and_equal_swaps_a_permutation():
    assert torch.equal(replacement_mapper(TOKENIZER, "a cat on a mat", "a cat on a mat"), torch.eye(L))
    mapper = replacement_mapper(TOKENIZER, "a cat on a mat", "a dog on a mat")
    assert torch.equal(mapper, torch.eye(L))  # same token counts: position to position


def test_swap_with_different_word_counts_names_the_words():
    with pytest.raises(ValueError, match=r"only in the edit: \['big'\].*refine"):
        replacement_mapper(TOKENIZER, "a cat on a mat", "a big cat on a mat")


def test_needleman_wunsch_insertions_and_substitutions():
    assert needleman_wunsch("ACGT", "ACGT") == [0, 1, 2, 3]
    assert needleman_wunsch("ACT", "ACGT") == [0, 1, -1, 2]  # G inserted
    assert needleman_wunsch("ACGT", "AT") == [0, 3]  # C, G deleted
    assert needleman_wunsch("AXT", "AYT") == [0, -1, 2]  # gap 0 beats mismatch: substitution = insert + delete


def test_refine_aligns_a_phrase_inserted_in_the_middle():
    source, target = "a cat on a mat", "a fluffy grey cat sitting on a mat"
    mapper, aligned = refinement_mapper(TOKENIZER, source, target)
    ids_s, ids_t = token_ids(TOKENIZER, source), token_ids(TOKENIZER, target)
    new = [p for w, ps in TOKENIZER.word_positions(target) if w in ("fluffy", "grey", "sitting") for p in ps]
    assert aligned[new].sum() == 0 and aligned.sum() == L - len(new)
    kept = [j for j in range(len(ids_t)) if aligned[j] == 1]
    assert [ids_s[mapper[j]] for j in kept] == [ids_t[j] for j in kept]  # same token on both sides
    assert [int(mapper[j]) for j in kept] == list(range(len(ids_s)))  # source order preserved, nothing lost
    assert mapper[len(ids_t) - 1] == len(ids_s) - 1  # EOS -> EOS
    assert torch.equal(mapper[len(ids_t):], torch.arange(len(ids_t), L))  # past the end: themselves


def test_refine_without_shared_words_names_the_words():
    with pytest.raises(ValueError, match="share no word.*'zebra'"):
        refinement_mapper(TOKENIZER, "a cat on a mat", "zebra")


def test_equalizer_per_word_values_on_every_sub_token():
    scale = equalizer(TOKENIZER, ["a hippopotamus on a red mat", "a cat on a mat"], {"hippopotamus": 2.0, "mat": -1})
    assert scale.shape == (2, L)
    assert scale[0, 2:5].tolist() == [2.0, 2.0, 2.0] and scale[0, 8] == -1 and scale[1, 5] == -1
    assert scale[0].sum() == L + 3 - 2 and scale[1].sum() == L - 2  # three tokens 1 -> 2, one 1 -> -1


def test_words_must_match_exactly_and_errors_name_them():
    with pytest.raises(ValueError, match="reweight word 'burger'"):
        equalizer(TOKENIZER, ["a burger."], {"burger": 2.0})
    assert word_positions_in(TOKENIZER, ["a burger.", "a burger"], "burger", "blend") == [[], [2]]
    assert word_positions_in(TOKENIZER, ["a cat and a cat"], "cat", "blend") == [[2, 5]]  # every occurrence


def test_cross_schedule_default_and_per_word():
    alphas = cross_replace_alphas(TOKENIZER, ["a lion on a mat"], 50, 1.0, {"lion": 0.4})
    assert alphas.shape == (50, 1, L)
    assert alphas[:, 0, 2].sum() == 20 and alphas[19, 0, 2] == 1 and alphas[20, 0, 2] == 0  # ⌊0.4·50⌋ calls
    assert alphas[:, 0, 3].sum() == 50
    alphas = cross_replace_alphas(TOKENIZER, ["a lion"], 50, 0.8)
    assert alphas[:, 0, 0].sum() == 40  # docs/methods.md §1.1: b = 0.8 -> calls 0–39
    assert calls_for(0.57, 100) == 57
    with pytest.raises(ValueError, match="cross-replace word 'tiger'"):
        cross_replace_alphas(TOKENIZER, ["a lion"], 10, 0.8, {"tiger": 0.2})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cross_replace_alphas(TOKENIZER, ["a lion"], 10, 1.5)


def test_self_schedule_bounds():
    assert self_replace_calls((0.0, 0.4), 50) == range(0, 20)
    assert self_replace_calls((0.2, 0.6), 10) == range(2, 6)
    with pytest.raises(ValueError, match="start <= end"):
        self_replace_calls((0.5, 0.2), 10)


def test_map_levels_relative_to_the_model():
    with torch.device("meta"):
        assert default_map_level(UNet(sd15().unet)) == 2  # 16² at 512 px
        assert default_map_level(UNet(tiny_sd1().unet)) == 1
        assert default_map_level(UNet(toy().unet)) == 1  # 8² of the toy model's 16² latents
    assert level_shape((64, 64), 2) == (16, 16) and level_shape((96, 96), 2) == (24, 24)
    assert level_shape((13, 10), 1) == (7, 5)  # ⌈side/2⌉ per stride-2 downsampler
    assert padded_ids("a")[-1] == EOS
