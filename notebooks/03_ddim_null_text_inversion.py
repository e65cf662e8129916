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
# # Editing a real image: DDIM inversion and null-text inversion
#
# *Denoising Diffusion Implicit Models* (Song et al., ICLR 2021) and *Null-text Inversion for Editing Real
# Images using Guided Diffusion Models* (Mokady et al., CVPR 2023). Code: `inversion/ddim_inversion.py`,
# `inversion/null_text.py`, `editing/p2p/edit.py`.
#
# To edit a picture the model never generated we need the noise $x_T$ that regenerates it. **DDIM inversion**
# runs the deterministic sampler backwards, from the current timestep $c$ to the next $n$:
#
# $$\varepsilon = \varepsilon_\theta(z_c, n, c_{\text{text}}),\quad
#   \hat x_0 = \frac{z_c - \sqrt{1-\bar\alpha_c}\,\varepsilon}{\sqrt{\bar\alpha_c}},\quad
#   z_n = \sqrt{\bar\alpha_n}\,\hat x_0 + \sqrt{1-\bar\alpha_n}\,\varepsilon,$$
#
# giving pivots $z^*_0 = z_0, \dots, z^*_N = x_T$. It uses $\varepsilon$ at $z_c$ in place of $z_n$ (a
# linearisation), which guidance $w = 7.5$ amplifies: sampling back from $z^*_N$ with guidance drifts.
# **Null-text inversion** keeps the prompt and learns one unconditional embedding $\varnothing_i$ per step so
# that guided DDIM retraces the pivots:
#
# $$\min_{\varnothing_i}\ \big\|\, \mathrm{DDIM}\big(\bar z_i,\ \varepsilon_\theta(\bar z_i, t_i, \varnothing_i)
#   + w\,(\varepsilon_\theta(\bar z_i, t_i, c) - \varepsilon_\theta(\bar z_i, t_i, \varnothing_i))\big) -
#   z^*_{N-1-i} \big\|^2,$$
#
# with Adam at lr $10^{-2}(1 - i/100)$, at most 10 iterations, stopping once the loss is below
# $10^{-5} + 2\cdot10^{-5}\,i$; then $\bar z$ advances one guided step with $\varnothing_i$.

# %%
import time

import matplotlib.pyplot as plt
import torch

from editing.evaluation.metrics.pixels import psnr
from editing.options import TOY_WEIGHTS
from editing.p2p import REAL_IMAGE_CONFIG, prompt_to_prompt
from inversion.ddim_inversion import ddim_invert, ddim_reconstruct, inversion_sampler
from inversion.null_text import NullTextConfig, early_stop_threshold, null_text_inversion
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents, encode_images
from ldm.toy import ShapeSpec, object_mask, read_colour, render, to_tensor

torch.set_num_threads(1)
torch.manual_seed(0)
started, cpu_started = time.perf_counter(), time.process_time()
model = StableDiffusion.load(TOY_WEIGHTS)
PROMPT, EDIT = "a red circle on a blue background", "a green circle on a blue background"
STEPS, GUIDANCE = 10, 7.5  # 10 DDIM steps keep this notebook short; the paper uses 50
picture, _ = render(ShapeSpec("circle", "red", "blue", texture="stripes", size=0.42, center=(0.4, 0.55)))
image = (to_tensor(picture)[None] + 1) / 2  # [1, 3, 64, 64] in [0, 1]
z0 = encode_images(model, image)  # 0.18215 · posterior mode; the mean for this diagonal Gaussian
sampler = inversion_sampler(model, STEPS)  # DDIM, η = 0, SD's grid t = 901, 801, …, 1

# %% [markdown]
# ## 1. DDIM inversion, then sampling back at $w = 1$ and $w = 7.5$

# %%
pivots = ddim_invert(model, z0, PROMPT, sampler, guidance=1.0)
back_1 = ddim_reconstruct(model, pivots[-1], PROMPT, sampler, guidance=1.0)
back_75 = ddim_reconstruct(model, pivots[-1], PROMPT, sampler, guidance=GUIDANCE)
print("pivots:", len(pivots), "std of x_T:", round(pivots[-1].std().item(), 3))

# %% [markdown]
# ## 2. Null-text inversion: the loss of each step's optimisation

# %%
t0 = time.perf_counter()
nti = null_text_inversion(model, z0, PROMPT, sampler, NullTextConfig(guidance=GUIDANCE))
print(f"null-text inversion: {time.perf_counter() - t0:.1f} s, inner iterations per step:",
      [len(losses) for losses in nti.losses])
config = NullTextConfig(guidance=GUIDANCE)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for i, losses in enumerate(nti.losses):
    axes[0].semilogy(range(len(losses)), losses, color=plt.cm.viridis(i / STEPS))
axes[0].set_xlabel("Adam iteration"), axes[0].set_ylabel("loss (colour: step i)")
axes[1].semilogy([losses[0] for losses in nti.losses], "o-", label="first iteration")
axes[1].semilogy([losses[-1] for losses in nti.losses], "o-", label="last iteration")
axes[1].semilogy([early_stop_threshold(i, config) for i in range(STEPS)], "k--", label="early-stop threshold")
axes[1].set_xlabel("step i"), axes[1].legend(fontsize=8)
fig.tight_layout(), fig.savefig("03-null-text-loss.png")
empty = model.encode_prompt([""])
drift = [(e - empty).norm().item() for e in nti.null_embeddings]
print("‖∅_i − CLIP(\"\")‖ per step:", [f"{d:.2f}" for d in drift])  # ∅_i starts from ∅_{i−1}: a drift
assert all(l[-1] <= l[0] for l in nti.losses)  # every step ends no worse than it started

# %% [markdown]
# ## 3. Reconstruction error of each

# %%
latent = {"DDIM, sampled at w = 1": back_1, "DDIM, sampled at w = 7.5": back_75,
          "null-text, w = 7.5": nti.reconstruction}
decoded = {name: decode_latents(model, z)[0] for name, z in latent.items()}
scores = {name: psnr(img, image[0]) for name, img in decoded.items()}
latent_mse = {name: (z - z0).pow(2).mean().item() for name, z in latent.items()}
fig, axes = plt.subplots(1, 4, figsize=(10, 2.9))
axes[0].imshow(picture), axes[0].set_title("input", fontsize=8), axes[0].axis("off")
for ax, (name, img) in zip(axes[1:], decoded.items()):
    ax.imshow(img.permute(1, 2, 0).numpy()), ax.axis("off")
    ax.set_title(f"{name}\nPSNR {scores[name]:.1f} dB, latent MSE {latent_mse[name]:.1e}", fontsize=7)
fig.tight_layout(), fig.savefig("03-reconstructions.png")
for name in latent:
    print(f"{name:>26}: PSNR {scores[name]:.2f} dB, latent MSE {latent_mse[name]:.2e}")
assert scores["null-text, w = 7.5"] > scores["DDIM, sampled at w = 7.5"] + 1.0
assert latent_mse["null-text, w = 7.5"] < 0.5 * latent_mse["DDIM, sampled at w = 7.5"]

# %% [markdown]
# ## 4. Editing from the null-text inversion with Prompt-to-Prompt
#
# The edit starts from $z^*_N$ with $[\varnothing_i;\ c]$ as the context of step $i$: "red" → "green".

# %%
result = prompt_to_prompt(model, PROMPT, EDIT, SamplingConfig(steps=STEPS, guidance=GUIDANCE, height=64, width=64),
                          REAL_IMAGE_CONFIG, noise=nti.noise, null_embeddings=nti.null_embeddings)
source, edited = (img.permute(1, 2, 0).double().numpy() for img in decode_latents(model, result.latents))
fig, axes = plt.subplots(1, 3, figsize=(6.5, 2.5))
for ax, img, title in zip(axes, (picture, source, edited), ("input", "source row", "edit: green")):
    ax.imshow(img), ax.set_title(title, fontsize=8), ax.axis("off")
fig.tight_layout(), fig.savefig("03-edit.png")
colour = read_colour(edited, object_mask(edited))
print("edited object colour:", colour)
assert colour == "green"
wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(f"ran in {wall:.1f} s, {cpu:.1f} s of CPU (after the imports)")
