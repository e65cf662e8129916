# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Textual inversion: learning a new word from a few images
#
# *An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion* (Gal et al., ICLR
# 2023). Code: `inversion/textual_inversion.py`, `inversion/embedding_optimiser.py`.
#
# A placeholder word $S_*$ gets a new row $v$ of the text encoder's token-embedding table, initialised from a
# one-token word; everything else is frozen. $v$ is learned with the diffusion model's own training loss on a
# few images $x$ of the concept, captioned by templates $y(S_*)$ (paper eq. 2):
#
# $$v^* = \arg\min_v\ \mathbb E_{z_0, y, \varepsilon, t}\,\big\|\varepsilon -
#   \varepsilon_\theta\big(\sqrt{\bar\alpha_t} z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\ t,\ 
#   \mathrm{CLIP}(y(S_*); v)\big)\big\|^2,\qquad z_0 = 0.18215\,z,\ z \sim q(z \mid x).$$
#
# On the toy model the concept is "a yellow diamond" (one word for both its colour and its shape), shown at a few
# places and sizes; then "a <S*> on a red background" should draw a yellow diamond on red, a combination the
# concept images never showed.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from editing.options import TOY_WEIGHTS
from inversion.embedding_optimiser import EmbeddingConfig
from inversion.textual_inversion import (add_placeholder, init_rows, inversion_loss, prepare_data,
                                         train_textual_inversion)
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents, text_to_image
from ldm.toy import ShapeSpec, object_mask, read_background, read_colour, read_shape, render, to_tensor

torch.set_num_threads(1)
torch.manual_seed(0)
started, cpu_started = time.perf_counter(), time.process_time()
model = StableDiffusion.load(TOY_WEIGHTS)
TOKEN, INIT = "<s*>", "shape"
places = [((0.5, 0.5), 0.45), ((0.35, 0.4), 0.38), ((0.62, 0.6), 0.4), ((0.4, 0.65), 0.42)]
concept = torch.cat([(to_tensor(render(ShapeSpec("diamond", "yellow", "white", size=s, center=c))[0])[None] + 1) / 2
                     for c, s in places])  # [4, 3, 64, 64] in [0, 1]
templates = ("a {} on a white background",)  # the toy world's own caption form
print("initializer row:", tuple(init_rows(model, INIT, 1).shape))

# %% [markdown]
# ## 1. Learning the embedding: the loss curve
#
# AdamW on the new row only (100 steps of batch 2, lr $5\cdot10^{-2}$; the reference: lr $5\cdot10^{-3}$ for
# 3000 steps on SD). A single step's loss depends mostly on its random $t$ and $\varepsilon$, so the curve is
# noisy; to compare embeddings we evaluate the same loss on fixed draws ($t$ = 100, 300, …, 900, the same
# $\varepsilon$ for every embedding).

# %%
t0 = time.perf_counter()
result = train_textual_inversion(model, concept, TOKEN, INIT, vectors=1,
                                 cfg=EmbeddingConfig(steps=100, lr=5e-2, batch=2, seed=0, checkpoint_every=10**6),
                                 progress=False, templates=templates)
print(f"trained in {time.perf_counter() - t0:.1f} s; kept the row after step {result.best_step}")
loss_fn = inversion_loss(model, prepare_data(model, concept, TOKEN, 1, templates))


def fixed_draw_loss(rows):
    with torch.no_grad():
        return np.mean([loss_fn(rows, torch.tensor([t] * len(concept)), torch.Generator().manual_seed(k)).item()
                        for k, t in enumerate(range(100, 1000, 200))])


evaluated = {"initializer": fixed_draw_loss(init_rows(model, INIT, 1)), "kept (best)": fixed_draw_loss(result.best),
             "final": fixed_draw_loss(result.final)}
print({name: f"{value:.4f}" for name, value in evaluated.items()})
fig, axes = plt.subplots(1, 2, figsize=(9, 3), gridspec_kw={"width_ratios": [2, 1]})
axes[0].plot(result.losses, alpha=0.35, label="loss of each step"), axes[0].plot(result.smoothed, label="smoothed")
axes[0].axvline(result.best_step, color="k", ls="--", label="kept"), axes[0].set_xlabel("step")
axes[0].set_yscale("log"), axes[0].legend(fontsize=8)
axes[1].bar(list(evaluated), list(evaluated.values())), axes[1].set_title("loss on fixed draws", fontsize=9)
axes[1].tick_params(axis="x", labelsize=7)
fig.tight_layout(), fig.savefig("09-loss.png")
assert evaluated["kept (best)"] < 0.75 * evaluated["initializer"]

# %% [markdown]
# ## 2. Using the new word
#
# `add_placeholder` appends the row to the table and teaches the tokenizer the word. We compare the learned word
# with the initializer word in a new context (4 noise draws each).

# %%
add_placeholder(model, TOKEN, result.best)
cfg = SamplingConfig(steps=20, guidance=7.5, scheduler="ddim", seed=0, height=64, width=64)
N = 4
reads, shown = {}, {}
for name, word in (("learned <s*>", TOKEN), ("initializer 'shape'", INIT)):
    images = decode_latents(model, text_to_image(model, [f"a {word} on a red background"] * N, cfg, progress=False))
    shown[name] = [img.permute(1, 2, 0).double().numpy() for img in images]
    reads[name] = [(read_colour(rgb, object_mask(rgb)), read_shape(rgb), read_background(rgb)) for rgb in shown[name]]
    print(name, reads[name])
fig, axes = plt.subplots(3, N, figsize=(2 * N, 6.3))
for c in range(N):
    axes[0, c].imshow(concept[c].permute(1, 2, 0).numpy()), axes[0, c].set_title("concept image", fontsize=8)
for r, name in enumerate(shown, start=1):
    for c, rgb in enumerate(shown[name]):
        axes[r, c].imshow(rgb), axes[r, c].set_title(f"{name}\n{' '.join(str(x) for x in reads[name][c])}", fontsize=7)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout(), fig.savefig("09-generated.png")
learned = reads["learned <s*>"]
assert sum(colour == "yellow" for colour, _, _ in learned) >= 3  # the word carries the concept's colour ...
assert sum(background == "red" for _, _, background in learned) >= 3  # ... and composes with a new background
assert sum(colour == "yellow" for colour, _, _ in reads["initializer 'shape'"]) <= 1
wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(f"ran in {wall:.1f} s, {cpu:.1f} s of CPU (after the imports)")
