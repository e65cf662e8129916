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
# # Stable Diffusion sampling: the schedule, classifier-free guidance and the denoising loop
#
# *High-Resolution Image Synthesis with Latent Diffusion Models* (Rombach et al., CVPR 2022), sampled with
# *Denoising Diffusion Implicit Models* (Song, Meng & Ermon, ICLR 2021) and *Classifier-Free Diffusion
# Guidance* (Ho & Salimans, 2021).
#
# Everything runs on editlab's bundled toy model (`ldm/toy/weights/toy-sd.safetensors`): the same UNet, VAE and
# CLIP text-encoder classes as Stable Diffusion 1.x, trained on 64×64 pictures of one coloured shape. This
# notebook calls editlab's own modules (`ldm.schedulers`, `ldm.pipeline`); it reimplements nothing.

# %%
import time

import matplotlib.pyplot as plt
import torch

from editing.options import TOY_WEIGHTS
from ldm.hooks import StepHook, guidance_batch, split_guidance
from ldm.model import StableDiffusion
from ldm.pipeline import (SamplingConfig, classifier_free_guidance, decode_latents, denoise, guided_unet,
                          initial_noise, sampler_for, text_context, text_to_image)
from ldm.schedulers import NoiseSchedule
from ldm.toy import object_mask, read_colour, read_shape

torch.set_num_threads(1)  # the toy model's operations are too small to split across threads
torch.manual_seed(0)
started, cpu_started = time.perf_counter(), time.process_time()
model = StableDiffusion.load(TOY_WEIGHTS)
PROMPT = "a red circle on a blue background"
print(model.config.unet)

# %% [markdown]
# ## 1. The noise schedule
#
# SD was trained with the "scaled linear" schedule over $T = 1000$ steps:
#
# $$\beta_t = \Big(\sqrt{\beta_0} + \tfrac{t}{T-1}\big(\sqrt{\beta_{T-1}} - \sqrt{\beta_0}\big)\Big)^2,\qquad
#   \beta_0 = 0.00085,\ \beta_{T-1} = 0.012,\qquad \bar\alpha_t = \prod_{s \le t} (1 - \beta_s).$$
#
# A noisy latent at step $t$ is $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$, so
# $\bar\alpha_t$ is the share of signal variance left and $\mathrm{SNR}(t) = \bar\alpha_t / (1-\bar\alpha_t)$.

# %%
schedule = NoiseSchedule.scaled_linear()
alpha_bar = schedule.alphas_cumprod
snr = alpha_bar / (1 - alpha_bar)
print(f"ᾱ_0 = {alpha_bar[0]:.5f}, ᾱ_999 = {alpha_bar[-1]:.5f}")
assert abs(alpha_bar[0].item() - 0.99915) < 1e-5 and abs(alpha_bar[-1].item() - 0.00466) < 1e-5

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(alpha_bar.numpy(), label=r"$\bar\alpha_t$")
axes[0].plot(schedule.betas.numpy() / schedule.betas.max().item(), label=r"$\beta_t / \beta_{max}$")
axes[0].set_xlabel("t"), axes[0].legend()
axes[1].semilogy(snr.numpy()), axes[1].set_xlabel("t"), axes[1].set_ylabel("SNR(t)")
fig.tight_layout(), fig.savefig("01-schedule.png")

# %% [markdown]
# ## 2. The timestep grid of a 20-step DDIM sampler
#
# SD's scheduler config spaces $N$ steps "leading" with offset 1: $t_k = k\,\lfloor 1000/N \rfloor + 1$, run in
# descending order. One DDIM step ($\eta = 0$) from $t$ to the next grid point $p$ is
#
# $$\hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}},\qquad
#   x_p = \sqrt{\bar\alpha_p}\,\hat x_0 + \sqrt{1-\bar\alpha_p}\,\hat\varepsilon.$$

# %%
cfg = SamplingConfig(steps=20, guidance=7.5, scheduler="ddim", seed=0, height=64, width=64)
sampler = sampler_for(model, cfg)
print("timesteps:", sampler.timesteps.tolist())
assert sampler.timesteps.tolist() == [k * 50 + 1 for k in reversed(range(20))]

# %% [markdown]
# ## 3. Classifier-free guidance
#
# One UNet call runs the batch $[\varnothing;\ c]$ (the empty prompt's and the prompt's text states), and
#
# $$\hat\varepsilon = \varepsilon_\theta(x_t, t, \varnothing) + w\,\big(\varepsilon_\theta(x_t, t, c) -
#   \varepsilon_\theta(x_t, t, \varnothing)\big).$$
#
# We compute it by hand from the two halves of one UNet call and compare it with editlab's predictor.

# %%
context = text_context(model, [PROMPT], None, cfg.guidance)  # [2, 77, C]: [uncond; cond]
generator = torch.Generator("cpu").manual_seed(cfg.seed)
x_T = initial_noise(model, 1, 64, 64, generator, context.dtype) * sampler.init_noise_sigma
t = sampler.timesteps[0]
with torch.no_grad():
    eps_u, eps_c = split_guidance(model.unet(guidance_batch(x_T), t, context))
    by_hand = eps_u + cfg.guidance * (eps_c - eps_u)
    editlab = guided_unet(model.unet, context, cfg.guidance)(x_T, t)
print("max |by hand − editlab| =", (by_hand - editlab).abs().max().item())
assert torch.equal(by_hand, classifier_free_guidance(eps_u, eps_c, cfg.guidance))
assert torch.allclose(by_hand, editlab, atol=1e-6)  # same kernels and inputs: equal up to float rounding

# %% [markdown]
# ## 4. The denoising loop
#
# `ldm.pipeline.denoise` is the one sampling loop every method uses: for each step $i$ it scales the input,
# calls the predictor (here CFG over the UNet) and takes the sampler step. A step hook sees the latents after
# every step; we keep them and decode a few, and check that the loop run by hand gives exactly
# `text_to_image`'s latents.

# %%
class KeepLatents(StepHook):
    def __init__(self):
        self.latents = []

    def end_step(self, i, t, latents):
        self.latents.append(latents.clone())
        return latents


keep = KeepLatents()
generator = torch.Generator("cpu").manual_seed(cfg.seed)
x_T = initial_noise(model, 1, 64, 64, generator, context.dtype) * sampler.init_noise_sigma
with torch.no_grad():
    final = denoise(sampler, guided_unet(model.unet, context, cfg.guidance), x_T, generator, hooks=[keep],
                    progress=False)
reference = text_to_image(model, [PROMPT], cfg, progress=False)
assert torch.equal(final, reference), "the loop by hand and text_to_image differ"

shown = [0, 4, 9, 14, 19]
images = decode_latents(model, torch.cat([keep.latents[i] for i in shown]))
fig, axes = plt.subplots(1, len(shown), figsize=(2 * len(shown), 2.3))
for ax, i, image in zip(axes, shown, images):
    ax.imshow(image.permute(1, 2, 0).numpy()), ax.set_title(f"after step {i} (t={int(sampler.timesteps[i])})",
                                                            fontsize=8), ax.axis("off")
fig.tight_layout(), fig.savefig("01-denoising.png")

# %% [markdown]
# ## 5. The guidance scale
#
# $w = 1$ is the conditional model alone; larger $w$ follows the prompt more closely. The toy readers
# (`ldm.toy.readers`) read back the colour and shape that were drawn.

# %%
scales = [1.0, 3.0, 7.5]
reads = []
fig, axes = plt.subplots(1, len(scales), figsize=(2 * len(scales), 2.3))
for ax, w in zip(axes, scales):
    image = decode_latents(model, text_to_image(model, [PROMPT], SamplingConfig(**{**cfg.__dict__, "guidance": w}),
                                                progress=False))[0]
    rgb = image.permute(1, 2, 0).double().numpy()  # [3, H, W] -> [H, W, 3]
    reads.append((read_colour(rgb, object_mask(rgb)), read_shape(rgb)))
    ax.imshow(rgb), ax.set_title(f"w = {w}: {reads[-1][0]} {reads[-1][1]}", fontsize=8), ax.axis("off")
fig.tight_layout(), fig.savefig("01-guidance.png")
print(reads)
assert reads[-1] == ("red", "circle"), reads  # at w = 7.5 the toy model draws what the prompt says
wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(f"ran in {wall:.1f} s, {cpu:.1f} s of CPU (after the imports)")
