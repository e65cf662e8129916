"""inversion.pez (PEZ hard-prompt search) on a tiny random open_clip CLIP with the real 49408-token vocabulary:
the embedding-injected text tower against encode_text, the cosine projection on a hand case, the search
raising the similarity with a text that scores what is reported, determinism, and bad input."""

import pytest
import torch

from inversion.pez import (PezConfig, encode_text_embeddings, nearest_tokens, prompt_ids, search_prompt,
                           text_similarity)
from ldm.tokenizer import BOS, EOS, Tokenizer

TINY_CLIP = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
SEARCH = PezConfig(length=6, steps=150, lr=0.1, weight_decay=0.1, seed=3)


def tiny_clip(seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**TINY_CLIP).eval().requires_grad_(False)


def target_features(clip) -> torch.Tensor:
    """CLIP image features of two fixed random images, [2, 16]."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return clip.encode_image(images)


def test_injected_text_forward_equals_encode_text():
    clip = tiny_clip()
    ids = Tokenizer(pad_token_id=0)(["a red circle on a blue background", "make it look like this", "x"])
    with torch.no_grad():
        expected = clip.encode_text(ids)
        got = encode_text_embeddings(clip, clip.token_embedding(ids), ids)
    assert got.shape == (3, 16)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    # pooling follows the ids: moving the end token changes the features
    shorter = ids.clone()
    shorter[0, 3] = EOS
    with torch.no_grad():
        moved = encode_text_embeddings(clip, clip.token_embedding(ids), shorter)
    assert not torch.allclose(moved[0], expected[0], atol=1e-3)
    assert prompt_ids(torch.tensor([5, 6]), 6).tolist() == [BOS, 5, 6, EOS, 0, 0]


def test_projection_picks_the_nearest_row_by_cosine():
    vocabulary = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])
    embeddings = torch.tensor([[1.0, 0.2],  # cos: row 0 (0.98) beats row 3 (0.83) though the dot product prefers 3
                               [0.1, 2.0],  # row 1
                               [-5.0, 1.0],  # row 2
                               [0.5, 0.6]])  # row 3 (cos 0.996)
    assert nearest_tokens(embeddings, vocabulary).tolist() == [0, 1, 2, 3]
    allowed = torch.tensor([False, True, True, True])
    assert nearest_tokens(embeddings, vocabulary, allowed).tolist() == [3, 1, 2, 3]


def test_search_raises_the_similarity_and_reports_what_the_text_scores():
    clip = tiny_clip()
    features = target_features(clip)
    start = search_prompt(clip, features, PezConfig(length=6, steps=1, seed=3), progress=False)  # the random init
    result = search_prompt(clip, features, SEARCH, progress=False)
    assert len(result.token_ids) == 6 and BOS not in result.token_ids and EOS not in result.token_ids
    assert result.search_similarity > start.search_similarity + 0.1
    assert result.similarity > start.similarity + 0.05
    # the reported similarity is the decoded text's own, with real tokenization
    assert result.similarity == pytest.approx(text_similarity(clip, result.text, features), abs=1e-6)
    ids = Tokenizer(pad_token_id=0)([result.text])
    with torch.no_grad():
        text_features = clip.encode_text(ids)
    cosine = torch.nn.functional.cosine_similarity(text_features, features).mean()
    assert result.similarity == pytest.approx(float(cosine), abs=1e-5)
    # the best projected ids score search_similarity: re-encode them (as ids, no text round trip)
    with torch.no_grad():
        projected = clip.encode_text(prompt_ids(torch.tensor(result.token_ids), 77)[None])
    cosine = torch.nn.functional.cosine_similarity(projected, features).mean()
    assert result.search_similarity == pytest.approx(float(cosine), abs=1e-5)
    assert Tokenizer().encode(result.text) == result.token_ids  # this case round-trips, so the two agree
    assert result.similarity == pytest.approx(result.search_similarity, abs=1e-5)


def test_search_is_deterministic_and_follows_the_generator():
    clip = tiny_clip()
    features = target_features(clip)
    cfg = PezConfig(length=4, steps=20, seed=0)
    first = search_prompt(clip, features, cfg, progress=False)
    again = search_prompt(clip, features, cfg, generator=torch.Generator().manual_seed(0), progress=False)
    other = search_prompt(clip, features, cfg, generator=torch.Generator().manual_seed(1), progress=False)
    assert (first.text, first.similarity, first.token_ids) == (again.text, again.similarity, again.token_ids)
    assert other.token_ids != first.token_ids


def test_bad_inputs_are_refused():
    clip = tiny_clip()
    features = target_features(clip)
    with pytest.raises(ValueError, match="prompt length 80"):
        search_prompt(clip, features, PezConfig(length=80), progress=False)
    with pytest.raises(ValueError, match=r"must be \[N, D\]"):
        search_prompt(clip, features[0], PezConfig(steps=2), progress=False)
    with pytest.raises(ValueError, match="no token_embedding"):
        search_prompt(torch.nn.Linear(2, 2), features, PezConfig(steps=2), progress=False)
