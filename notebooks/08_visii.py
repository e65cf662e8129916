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
# # Visii: learning an instruction from one before/after pair
#
# *Visual Instruction Inversion: Image Editing via Visual Prompting* (Nguyen, Li, Ojha & Lee, NeurIPS 2023).
# Code: `inversion/visii.py`, `inversion/embedding_optimiser.py`, `editing/instruct_pix2pix/editor.py`.
#
# Some edits are easier to show than to say. Visii takes an InstructPix2Pix model and one example pair
# (before $x$, after $y$) and learns the instruction as the text encoder's **output** hidden states $c$
# ($[77, C]$; positions $1 \dots \mathrm{eos}-1$ learn, BOS/EOS/padding stay), starting from a given text. Each
# step draws $t$ and $\varepsilon$, noises the after-latent, denoises it with the three-way guidance *inside the
# loss*, and adds a CLIP direction term:
#
# $$z_0 = 0.18215\,\mathcal E(y),\quad x_t = \sqrt{\bar\alpha_t}\,z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\quad
#   \hat\varepsilon = \mathrm{IP2P}_{s_T, s_I}(x_t, t;\ c,\ c_I = \mathcal E(x)),$$
#
# $$L = 4\,\|\hat\varepsilon - \varepsilon\|^2 - \lambda_{clip}\,
#   \mathrm{clamp}\big(\cos(d_{img}, \hat t),\,-1,\,0.5\big),\qquad
#   d_{img} = \frac{\mathrm{CLIP}_{img}(y) - \mathrm{CLIP}_{img}(x)}{\|\cdot\|},\ 
#   \hat t = \frac{P\,\overline{c}}{\|\cdot\|}.$$
#
# The learned $c$ then replaces CLIP(instruction) when editing a new image. Here: learned from a red → green
# circle, applied to a blue square, on the toy InstructPix2Pix model with the toy CLIP.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from editing.instruct_pix2pix.editor import EditConfig, apply_instruction
from editing.options import TOY_CLIP_WEIGHTS, TOY_IP2P_WEIGHTS
from inversion.visii import VisiiConfig, edit_direction, train_visii, visii_training
from ldm.clip_models import load_clip
from ldm.model import StableDiffusion
from ldm.pipeline import decode_latents
from ldm.toy import ShapeSpec, object_mask, read_colour, render, to_tensor

torch.set_num_threads(1)
torch.manual_seed(0)
started, cpu_started = time.perf_counter(), time.process_time()
model = StableDiffusion.load(TOY_IP2P_WEIGHTS)
clip = load_clip(TOY_CLIP_WEIGHTS, None, text_tower=False)  # the toy CLIP's image tower and text projection


def image_of(spec):
    return (to_tensor(render(spec)[0])[None] + 1) / 2  # [1, 3, 64, 64] in [0, 1]


before = image_of(ShapeSpec("circle", "red", "white", size=0.42))
after = image_of(ShapeSpec("circle", "green", "white", size=0.42))
test = image_of(ShapeSpec("square", "blue", "white", size=0.42))
INIT = "make the shape"
print("CLIP edit direction d_img:", tuple(edit_direction(clip, before, after).shape))

# %% [markdown]
# ## 1. Learning the instruction
#
# The reference runs 1000 steps (each timestep once) at lr $10^{-3}$; on the toy model 200 steps at lr
# $3\cdot10^{-2}$ learn this edit (λ_clip = 0.1, the paper's weight). The raw loss of one step depends mostly on
# its random $t$ and $\varepsilon$, so we plot it with its smoothed average (the engine keeps the states at the
# lowest smoothed loss).

# %%
t0 = time.perf_counter()
result = train_visii(model, clip, before, after, INIT, VisiiConfig(),
                     visii_training(steps=200, lr=3e-2, seed=0, checkpoint_every=10**6), progress=False)
run = result.run
print(f"trained in {time.perf_counter() - t0:.1f} s; best smoothed loss at step {run.best_step}")
initial = model.encode_prompt([INIT])[0]
moved = (result.instruction - initial).norm(dim=-1)  # per position
print("positions that moved:", moved.nonzero().flatten().tolist(), "(eos =", result.eos, ")")
assert moved[1:result.eos].min() > 0 and moved[0] == 0 and moved[result.eos:].max() == 0  # only 1 … eos−1 learn
first, last = np.mean(run.smoothed[20:40]), np.mean(run.smoothed[-20:])
print(f"smoothed loss: {first:.4f} (steps 20-40) -> {last:.4f} (last 20)")
assert last < first

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(run.losses, alpha=0.35, label="loss of each step")
ax.plot(run.smoothed, label="smoothed"), ax.axvline(run.best_step, color="k", ls="--", label="kept")
ax.set_xlabel("step"), ax.set_yscale("log"), ax.legend(fontsize=8)
fig.tight_layout(), fig.savefig("08-visii-loss.png")

# %% [markdown]
# ## 2. Applying it to a new image
#
# The learned states and, for comparison, the initial text "make the shape" on a blue square (4 noise draws,
# DDIM 20 steps, $s_T$ 7.5, $s_I$ 1.5).

# %%
N = 4
edit = EditConfig(steps=20, scheduler="ddim", text_guidance=7.5, image_guidance=1.5, seed=0)
tests = test.repeat(N, 1, 1, 1)
learned = decode_latents(model, apply_instruction(model, tests, result.instruction, edit, progress=False))
plain = decode_latents(model, apply_instruction(model, tests, initial, edit, progress=False))
colours = {}
for name, images in (("learned", learned), ("init text", plain)):
    rgbs = [img.permute(1, 2, 0).double().numpy() for img in images]  # [3, H, W] -> [H, W, 3]
    colours[name] = [read_colour(rgb, object_mask(rgb)) for rgb in rgbs]
print(colours)
fig, axes = plt.subplots(2, N + 2, figsize=(2 * (N + 2), 4.2))
for r, (name, images) in enumerate((("learned", learned), ("init text", plain))):
    pair = (before, after) if r == 0 else (test, None)
    for ax, img, title in zip(axes[r, :2], pair, ("before", "after") if r == 0 else ("test image", "")):
        if img is not None:
            ax.imshow(img[0].permute(1, 2, 0).numpy()), ax.set_title(title, fontsize=8)
        ax.axis("off")
    for ax, img, colour in zip(axes[r, 2:], images, colours[name]):
        ax.imshow(img.permute(1, 2, 0).numpy()), ax.axis("off"), ax.set_title(f"{name}: {colour}", fontsize=8)
fig.tight_layout(), fig.savefig("08-visii-applied.png")
assert sum(c == "green" for c in colours["learned"]) >= 3  # the learned instruction recolours the square green
assert sum(c == "green" for c in colours["init text"]) <= 1  # the text it started from does not
wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(f"ran in {wall:.1f} s, {cpu:.1f} s of CPU (after the imports)")
