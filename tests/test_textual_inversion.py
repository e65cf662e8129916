"""inversion.textual_inversion on tiny_sd1(): placeholder tokens, training (only the new rows learn, loss falls,
exact resume), and file interop with diffusers (both directions) and A1111 .pt files."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from inversion.embedding_optimiser import EmbeddingConfig, draw_timesteps
from inversion.textual_inversion import (PlaceholderTokenizer, add_placeholder, inversion_loss, load_textual_inversion,
                                         prepare_data, read_embedding_file, save_learned_embeds,
                                         train_textual_inversion)
from ldm.config import tiny_sd1
from ldm.model import StableDiffusion
from ldm.tokenizer import EOS, Tokenizer
from ldm.training import step_generator


def tiny_model(seed: int = 0) -> StableDiffusion:
    torch.manual_seed(seed)
    return StableDiffusion(tiny_sd1()).eval()


def concept_images() -> torch.Tensor:
    """Three 16×16 images of one "concept": a bright square on a dark ground, slightly shifted."""
    images = torch.full((3, 3, 16, 16), 0.1)
    for i in range(3):
        images[i, :, 4 + i:10 + i, 5:11] = torch.tensor([0.9, 0.6, 0.2]).view(3, 1, 1)
    return images


def test_placeholder_tokenizer_matches_before_bpe():
    base = Tokenizer()
    tokenizer = PlaceholderTokenizer(base, {"<cat-toy>": [49408, 49409], "<cat-toy>_1": [49409]})
    ids = tokenizer.encode("a photo of a <cat-toy> toy")
    assert ids == base.encode("a photo of a") + [49408, 49409] + base.encode("toy")
    assert tokenizer.encode("<cat-toy>_1 x") == [49409] + base.encode("x")  # longest name wins
    row = tokenizer("a <cat-toy>")[0]
    assert row[:5].tolist() == [49406] + base.encode("a") + [49408, 49409, EOS]
    assert tokenizer.decode(ids) == "a photo of a <cat-toy> <cat-toy>_1 toy"


def test_training_moves_only_the_new_rows_and_lowers_the_loss():
    model = tiny_model()
    table = model.text_encoder.text_model.embeddings.token_embedding.weight.detach().clone()
    cfg = EmbeddingConfig(steps=30, lr=2e-2, batch=4, seed=1, loss_smoothing=0.8)
    images = concept_images()
    result = train_textual_inversion(model, images, "<cat-toy>", "toy", vectors=2, cfg=cfg, progress=False)
    toy = Tokenizer().encode("toy")[0]
    assert result.best.shape == (2, 32) and not torch.equal(result.final, table[toy].repeat(2, 1))
    assert torch.equal(model.text_encoder.text_model.embeddings.token_embedding.weight, table)  # table untouched

    # fixed evaluation draws (seed 99), same for both embeddings: the learned rows fit the images better
    loss_fn = inversion_loss(model, prepare_data(model, images, "<cat-toy>", 2))
    eval_cfg = EmbeddingConfig(batch=16, seed=99)

    def evaluate(rows):
        with torch.no_grad():
            return sum(loss_fn(rows, draw_timesteps(eval_cfg, s, g := step_generator(99, s)), g).item()
                       for s in range(4))

    assert evaluate(result.best) < evaluate(table[toy].repeat(2, 1))


def test_resume_is_exact(tmp_path):
    cfg = EmbeddingConfig(steps=6, lr=1e-2, batch=2, seed=2, checkpoint_every=2)
    straight = train_textual_inversion(tiny_model(), concept_images(), "<x>", "toy", cfg=cfg, progress=False)
    train_textual_inversion(tiny_model(), concept_images(), "<x>", "toy", cfg=cfg, checkpoint=tmp_path / "c.pt",
                            stop_at=3, progress=False)
    resumed = train_textual_inversion(tiny_model(), concept_images(), "<x>", "toy", cfg=cfg,
                                      checkpoint=tmp_path / "c.pt", resume=True, progress=False)
    assert torch.equal(resumed.final, straight.final) and resumed.losses == straight.losses


def test_bad_tokens_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="single CLIP token"):
        train_textual_inversion(model, concept_images(), "<x>", "cat toy", progress=False)
    with pytest.raises(ValueError, match="already exists"):
        train_textual_inversion(model, concept_images(), "toy", "toy", progress=False)


@pytest.mark.parametrize("vectors", [1, 3])
def test_editlab_file_loads_in_diffusers_with_the_same_text_output(tmp_path, vectors):
    from editing.bench.peers import diffusers_pipeline

    model = tiny_model()
    rows = torch.randn(vectors, 32, generator=torch.Generator().manual_seed(vectors))
    path = tmp_path / "learned_embeds.safetensors"
    save_learned_embeds(path, "<cat-toy>", rows)
    stored = load_file(str(path))
    assert list(stored) == ["<cat-toy>"] and stored["<cat-toy>"].shape == ((32,) if vectors == 1 else (vectors, 32))

    pipe = diffusers_pipeline(model)
    pipe.load_textual_inversion(str(path), token="<cat-toy>")
    prompt = "a photo of a <cat-toy> on a table"
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        assert load_textual_inversion(model, path) == "<cat-toy>"
        ours = model.encode_prompt([prompt])
    assert (ours - theirs).abs().max() <= 1e-5
    plain = StableDiffusion(tiny_sd1())
    plain.load_state_dict(tiny_model().state_dict())
    assert (ours - plain.encode_prompt([prompt])).abs().max() > 1e-3  # the token really changed the output


def test_diffusers_and_a1111_files_load_in_editlab(tmp_path):
    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    save_file({"<dog>": rows}, str(tmp_path / "learned_embeds.safetensors"))  # diffusers' format, by hand
    torch.save({"string_to_param": {"*": rows}, "string_to_token": {"*": 265}, "name": "my-dog", "step": 6099},
               tmp_path / "a1111.pt")
    assert read_embedding_file(tmp_path / "a1111.pt")[0] == "my-dog"
    for file, token in [("learned_embeds.safetensors", "<dog>"), ("a1111.pt", "<dog>")]:
        model = tiny_model()
        assert load_textual_inversion(model, tmp_path / file, token="<dog>") == token
        table = model.text_encoder.text_model.embeddings.token_embedding.weight
        assert torch.equal(table[-2:], rows) and model.tokenizer.encode("<dog>") == [49408, 49409]
        assert model.tokenizer.encode("<dog>_1") == [49409]
    with pytest.raises(ValueError, match="width 32"):
        add_placeholder(tiny_model(), "<cat>", torch.zeros(768))  # an SD 1 embedding on a 32-wide encoder


def test_command_line(tmp_path):
    from editing.cli import main
    from ldm.images import save_png

    tiny_model().save(tmp_path / "sd.safetensors")
    (tmp_path / "images").mkdir()
    for i, image in enumerate(concept_images()):
        save_png(tmp_path / "images" / f"{i}.png", image, {})
    out = tmp_path / "cat-toy.safetensors"
    argv = ["textual-inversion", "--weights", str(tmp_path / "sd.safetensors"), "--images", str(tmp_path / "images"),
            "--token", "<cat-toy>", "--init-word", "toy", "--vectors", "2", "--size", "16", "--steps", "3",
            "--batch", "2", "--out", str(out)]
    assert main(argv) == 0
    model = tiny_model()
    assert load_textual_inversion(model, out) == "<cat-toy>"
    assert model.tokenizer.encode("<cat-toy>") == [49408, 49409]
    assert main(argv) == 2  # refuses to overwrite
    assert main(argv[:-1] + [str(tmp_path / "x.pt")]) == 2
