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
# # InstructPix2Pix: editing by a written instruction, with two guidance scales
#
# *InstructPix2Pix: Learning to Follow Image Editing Instructions* (Brooks, Holynski & Efros, CVPR 2023).
# Code: `controls/image_condition.py` (the image conditioning and the guidance), `editing/instruct_pix2pix/`.
#
# The UNet reads 8 channels, $[z_t \,\|\, c_I]$, where $c_I = \mathcal E(x).\mathrm{mode}()$ is the input
# image's latent (**unscaled**), and cross-attends to the instruction $c_T$. Trained with both conditions
# dropped at random, it can be asked three questions in one batch, $[(c_T, c_I), (\varnothing_T, c_I),
# (\varnothing_T, \varnothing_I)]$ ($\varnothing_I$ an all-zero latent), combined as (paper eq. 3)
#
# $$\tilde\varepsilon = \varepsilon(\varnothing_T, \varnothing_I)
#   + s_I\,\big(\varepsilon(\varnothing_T, c_I) - \varepsilon(\varnothing_T, \varnothing_I)\big)
#   + s_T\,\big(\varepsilon(c_T, c_I) - \varepsilon(\varnothing_T, c_I)\big).$$
#
# $s_I$ pulls towards the input image, $s_T$ towards the instruction. The toy model
# (`toy-ip2p.safetensors`) is the toy UNet fine-tuned this way on pairs made by Prompt-to-Prompt.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from controls.image_condition import image_condition, instruction_context, three_way_guidance
from editing.evaluation.metrics.pixels import psnr
from editing.instruct_pix2pix.editor import EditConfig, edit_by_instruction
from editing.instruct_pix2pix.grid import labelled_grid
from editing.options import TOY_IP2P_WEIGHTS
from ldm.images import to_pil
from ldm.model import StableDiffusion
from ldm.pipeline import decode_latents
from ldm.toy import ShapeSpec, object_mask, read_colour, render, to_tensor

torch.set_num_threads(1)
torch.manual_seed(0)
started, cpu_started = time.perf_counter(), time.process_time()
model = StableDiffusion.load(TOY_IP2P_WEIGHTS)  # its VAE and text encoder come from toy-sd.safetensors beside it
INSTRUCTION = "make the square green"
picture, mask = render(ShapeSpec("square", "blue", "white", size=0.42))
image = (to_tensor(picture)[None] + 1) / 2  # [1, 3, 64, 64] in [0, 1]
print("conv_in reads", model.unet.conv_in.weight.shape[1], "channels")
assert model.unet.conv_in.weight.shape[1] == 2 * model.config.vae.latent_channels  # [z_t ‖ c_I]

# %% [markdown]
# ## 1. The three-way guidance, by hand
#
# One UNet call on the three rows; the formula applied by hand equals editlab's predictor. With $s_T = s_I = 1$
# the formula collapses to the fully conditional row, $\tilde\varepsilon = \varepsilon(c_T, c_I)$.

# %%
c_I = image_condition(model, image)  # unscaled posterior mode [1, 4, 16, 16]
context = instruction_context(model, [INSTRUCTION], 1)  # [c_T; ∅_T; ∅_T]
x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
t = torch.tensor(501)
s_T, s_I = 7.5, 1.5
with torch.no_grad():
    rows = torch.cat([torch.cat([x, x, x]), torch.cat([c_I, c_I, torch.zeros_like(c_I)])], dim=1)  # [3, 8, h, w]
    full, image_only, unconditional = model.unet(rows, t, context).chunk(3)
    by_hand = unconditional + s_I * (image_only - unconditional) + s_T * (full - image_only)
    editlab = three_way_guidance(model.unet, context, c_I, s_T, s_I)(x, t)
    ones = three_way_guidance(model.unet, context, c_I, 1.0, 1.0)(x, t)
print("max |by hand − editlab| =", (by_hand - editlab).abs().max().item())
assert torch.allclose(by_hand, editlab, atol=1e-6)  # the same one UNet call; float rounding at most
assert torch.allclose(ones, full, atol=1e-5)

# %% [markdown]
# ## 2. The $s_T \times s_I$ grid
#
# DDIM, 20 steps, the same noise in every cell. We measure how much of the input survives (PSNR of the whole
# output against the input) and whether the square turned green.

# %%
text_scales, image_scales = [3.0, 7.5, 12.0], [1.0, 1.5, 2.5]
cells, fidelity, colours = [], np.zeros((3, 3)), {}
for r, s_i in enumerate(image_scales):
    row = []
    for c, s_t in enumerate(text_scales):
        cfg = EditConfig(steps=20, scheduler="ddim", text_guidance=s_t, image_guidance=s_i, seed=0)
        out = decode_latents(model, edit_by_instruction(model, image, [INSTRUCTION], cfg, progress=False))[0]
        rgb = out.permute(1, 2, 0).double().numpy()
        fidelity[r, c] = psnr(out, image[0])
        colours[s_t, s_i] = read_colour(rgb, object_mask(rgb))
        row.append(to_pil(out))
    cells.append(row)
grid = labelled_grid(cells, text_scales, image_scales, input_image=to_pil(image[0]))
grid.save("05-guidance-grid.png")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
axes[0].imshow(np.asarray(grid)), axes[0].axis("off"), axes[0].set_title(f'"{INSTRUCTION}"', fontsize=9)
image_psnr = axes[1].imshow(fidelity, cmap="viridis")
axes[1].set_xticks(range(3), [f"s_T={s:g}" for s in text_scales])
axes[1].set_yticks(range(3), [f"s_I={s:g}" for s in image_scales])
for r in range(3):
    for c in range(3):
        axes[1].text(c, r, f"{fidelity[r, c]:.1f} dB\n{colours[text_scales[c], image_scales[r]]}", ha="center",
                     va="center", fontsize=7, color="white")
axes[1].set_title("PSNR to the input; object colour", fontsize=9)
fig.tight_layout(), fig.savefig("05-guidance-psnr.png")
print("PSNR to the input (rows s_I, columns s_T):\n", fidelity.round(1))
print(colours)
assert colours[7.5, 1.5] == "green"  # the paper's default scales make the edit
assert fidelity[-1, 1] > fidelity[0, 1]  # at s_T 7.5: a larger s_I keeps more of the input image ...
assert (fidelity[:, 0] > fidelity[:, -1]).all()  # ... and at every s_I a smaller s_T does too
wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(f"ran in {wall:.1f} s, {cpu:.1f} s of CPU (after the imports)")
