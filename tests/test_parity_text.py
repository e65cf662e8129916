"""Text encoders and tokenizer after conversion vs their reference libraries (random weights, fp32).

- SD 1.x layout (``cond_stage_model.transformer.``, CLIP-L, identity) vs transformers' CLIPTextModel;
- SD 2.x layout (``cond_stage_model.model.``, open_clip, in_proj split) vs open_clip's own modules: the
  penultimate block's output + ln_final; and with the whole tower kept, the pooled, projected embedding
  (text_projection transposed) vs open_clip's forward;
- token ids vs transformers' CLIPTokenizer on open_clip's vocabulary, for both pad conventions.
Prompts include an empty one and one longer than 77 tokens. Measured max|a − b| / max|a|: 0 (bit-identical)
for CLIP-L, open_clip's penultimate layer and its pooled projection.
"""

import dataclasses

import pytest
import torch

from ldm.clip import CLIPTextModel
from ldm.config import tiny_sd1, tiny_sd2
from ldm.tokenizer import Tokenizer
from tests import peers
from weights_convert import assemble
from weights_convert.ldm_text import convert_clip, convert_open_clip

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "A  Painting, of a CAT!! (by Monet) -- 3.5x zoom; Café naïve 東京",
    " ".join(["a colourful, detailed painting of a red fox in the snow"] * 10),  # 110 tokens: cut to 75
]


def converted_text_encoder(mapping, cfg) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    tensors, report = assemble(mapping, model)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def test_sd1_clip_matches_transformers():
    cfg = tiny_sd1().text
    reference = peers.make_clip_text_model(cfg, seed=3)
    checkpoint = {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in reference.state_dict().items()}
    ours = converted_text_encoder(convert_clip(checkpoint), cfg)
    ids = Tokenizer(cfg.pad_token_id)(PROMPTS)
    expected = reference(ids).last_hidden_state
    assert ids.shape == (4, 77) and expected.std() > 0.1
    assert peers.relative_error(expected, ours(ids)) <= 1e-5


@torch.no_grad()
def test_sd2_open_clip_penultimate_layer_matches_open_clip():
    cfg = tiny_sd2().text
    tower = peers.make_open_clip_text(cfg, seed=4)  # cfg.n_layers + 1 blocks
    checkpoint = {"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()}
    checkpoint["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    ours = converted_text_encoder(convert_open_clip(checkpoint, cfg.n_layers, projection=False), cfg)
    ids = Tokenizer(cfg.pad_token_id)(PROMPTS)
    expected = peers.open_clip_hidden_states(tower, ids)
    assert expected.std() > 0.1
    assert peers.relative_error(expected, ours(ids)) <= 1e-5

    whole = dataclasses.replace(cfg, n_layers=cfg.n_layers + 1, projection_dim=16)
    full = converted_text_encoder(convert_open_clip(checkpoint, whole.n_layers, projection=True), whole)
    pooled = full.pooled(full(ids), ids)  # the end token's state, projected: open_clip's encode_text
    assert peers.relative_error(tower(ids), pooled) <= 1e-5


@pytest.mark.parametrize("pad_token_id", [49407, 0], ids=["sd1-pad-eos", "sd2-pad-0"])
def test_token_ids_match_transformers_clip_tokenizer(tmp_path, pad_token_id):
    """transformers' SD 2 tokenizer declares "!" (id 0) its pad token and so splits "!" out of words as a
    special token ("!!" -> 0, 0), unlike open_clip, which SD 2 was trained with ("!!" -> 748); prompts with
    "!" are compared with open_clip only."""
    from open_clip import tokenize

    prompts = PROMPTS if pad_token_id == 49407 else [p for p in PROMPTS if "!" not in p]
    reference = peers.make_hf_tokenizer(tmp_path, pad_token_id)
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ours = Tokenizer(pad_token_id)(prompts)
    assert torch.equal(ours, expected)
    assert ours[-1, -1] == 49407 and ours[1, :3].tolist() == [49406, 49407, pad_token_id]
    if pad_token_id == 0:
        assert torch.equal(Tokenizer(0)(PROMPTS), tokenize(PROMPTS, context_length=77))
