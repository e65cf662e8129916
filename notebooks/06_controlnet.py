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
# # ControlNet: zero convolutions, the hint encoder, and the control scale
#
# *Adding Conditional Control to Text-to-Image Diffusion Models* (Zhang, Rao & Agrawala, ICCV 2023). Code:
# `controls/controlnet.py`, `controls/guidance.py`, `controls/train.py`, `controls/canny.py`.
#
# A ControlNet is a trainable copy $F'$ of the UNet's encoder and middle block, fed the hint $c$ through a small
# hint encoder $E$; each of its outputs leaves through a **zero convolution** $Z$ (1×1; 3×3 at the end of $E$;
# weight and bias start at 0) and is added to the locked UNet's skip connections, times a scale $s$ (paper eq. 2):
#
# $$y = F(x) + s\cdot Z\big(F'(x + Z(E(c)))\big).$$
#
# At initialisation every $Z$ outputs exactly zero, so the controlled model **is** the original model, and
# training starts from there without harming it. Yet $Z$ learns: for $y = Wx + b$ with $W = 0$,
# $\partial L/\partial W = (\partial L/\partial y)\,x^\top \neq 0$, while everything *before* $Z$ gets no
# gradient until $W$ has moved.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from controls.canny import canny
from controls.controlnet import ControlNet
from controls.guidance import Control, controlnet_to_image
from controls.hints import to_hint
from controls.train import ControlledUNet, ControlTrainConfig, ToyCannyTriples, recipe, train_controlnet
from editing.commands.train_controlnet import hint_channels
from editing.options import TOY_WEIGHTS
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents, encode_images, text_to_image
from ldm.schedulers import NoiseSchedule, q_sample
from ldm.toy import ShapeSpec, render, to_tensor

torch.set_num_threads(1)
torch.manual_seed(0)
started, cpu_started = time.perf_counter(), time.process_time()
model = StableDiffusion.load(TOY_WEIGHTS)
PROMPT = "a red square on a blue background"
picture, _ = render(ShapeSpec("triangle", "green", "white", size=0.5, center=(0.55, 0.45)))
image = (to_tensor(picture)[None] + 1) / 2  # [1, 3, 64, 64] in [0, 1]
hint = to_hint(canny(image), 64, 64)  # white edges on black, [1, 3, 64, 64] in [0, 1]
net = ControlNet.from_unet(model.unet, hint_channels(model.config.vae.downsample_factor))
print("hint encoder widths:", net.control_config.hint_channels, "-> downsamples", net.control_config.hint_factor, "x")
print("residuals:", net.control_config.n_residuals, "(one per skip connection + the middle block)")

# %% [markdown]
# ## 1. At initialisation every zero convolution outputs exactly 0
#
# We read the hint encoder's last features (the input of its zero conv) with a forward hook, and the residuals
# the ControlNet hands to the UNet (13 in SD 1.5: 12 skips and the middle block; 7 on the toy UNet).

# %%
features = {}
net.controlnet_cond_embedding.conv_out.register_forward_hook(lambda m, inp, out: features.update(inner=inp[0], out=out))
context = model.encode_prompt([PROMPT])
x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    down, mid = net(x, torch.tensor(501), context, hint)
print("hint encoder: inner features", tuple(features["inner"].shape), "|max|", f"{features['inner'].abs().max():.3f}",
      "-> Z(E(c))", tuple(features["out"].shape), "|max|", features["out"].abs().max().item())
print("residual |max|:", [r.abs().max().item() for r in down + [mid]])
assert features["inner"].abs().max() > 0  # the hint encoder sees the edges ...
assert features["out"].abs().max() == 0  # ... and its zero conv passes nothing on
assert all(r.abs().max() == 0 for r in down + [mid])  # every residual is exactly 0

fig, axes = plt.subplots(1, 6, figsize=(12, 2.2))
axes[0].imshow(picture), axes[0].set_title("image", fontsize=8)
axes[1].imshow(hint[0].permute(1, 2, 0).numpy()), axes[1].set_title("Canny hint", fontsize=8)
for k, ax in enumerate(axes[2:]):
    ax.imshow(features["inner"][0, k].numpy(), cmap="magma"), ax.set_title(f"E(c) channel {k}", fontsize=8)
for ax in axes:
    ax.axis("off")
fig.tight_layout(), fig.savefig("06-hint-encoder.png")

# %% [markdown]
# So sampling with the fresh ControlNet gives the plain model's image, bit for bit.

# %%
cfg = SamplingConfig(steps=20, guidance=7.5, scheduler="ddim", seed=0, height=64, width=64)
plain = text_to_image(model, [PROMPT], cfg, progress=False)
controlled = controlnet_to_image(model, [Control(net, hint, scale=1.0)], [PROMPT], cfg, progress=False)
assert torch.equal(plain, controlled)

# %% [markdown]
# ## 2. The gradients at initialisation
#
# One training loss, $\|\varepsilon - \varepsilon_\theta(x_t, t, c_t, c_f)\|^2$ with
# $x_t = \sqrt{\bar\alpha_t}z_0 + \sqrt{1-\bar\alpha_t}\varepsilon$: the zero convs get gradients, the hint
# encoder's inner convs and the copied encoder $F'$ none.

# %%
z0 = encode_images(model, image)
noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
alpha_bar = NoiseSchedule.scaled_linear().alphas_cumprod[500]
wrapper = ControlledUNet(model.unet, net)
model.requires_grad_(False)
net.zero_grad()
loss = F.mse_loss(wrapper(q_sample(z0, noise, alpha_bar), torch.tensor([500]), context, hint), noise)
loss.backward()
grad_norm = lambda modules: sum(p.grad.norm().item() ** 2 for m in modules for p in m.parameters()) ** 0.5
zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
inner = [net.controlnet_cond_embedding.conv_in, *net.controlnet_cond_embedding.blocks]
encoder = [net.conv_in, *net.down_blocks, net.mid_block]
norms = {"zero convs": grad_norm(zero_convs), "hint encoder (inner)": grad_norm(inner),
         "copied encoder F'": grad_norm(encoder)}
print({name: f"{value:.2e}" for name, value in norms.items()})
assert norms["zero convs"] > 0 and norms["hint encoder (inner)"] == 0 and norms["copied encoder F'"] == 0

# %% [markdown]
# ## 3. A short training run, then the control scale
#
# 15 steps on toy images with their Canny edges (AdamW; a larger learning rate than the paper's $10^{-5}$ so
# that 15 steps show something; `editlab train-controlnet` runs the real recipe). The residuals scale linearly
# with $s$: $s = 0$ is the plain model.

# %%
net, losses = train_controlnet(model, net, ToyCannyTriples(32, seed=0),
                               recipe(lr=2e-3, steps=15, checkpoint_every=10**6), ControlTrainConfig(batch=2),
                               progress=False)
with torch.no_grad():
    down_1, mid_1 = net(x, torch.tensor(501), context, hint, scales=1.0)
    down_2, mid_2 = net(x, torch.tensor(501), context, hint, scales=2.0)
size = [r.abs().mean().item() for r in down_1 + [mid_1]]
print("mean |residual| per skip after training:", [f"{s:.3f}" for s in size])
assert min(size) > 0  # the zero convs have left zero
assert all(torch.allclose(2 * a, b, rtol=1e-5, atol=1e-6) for a, b in zip(down_1 + [mid_1], down_2 + [mid_2]))

scales = [0.0, 0.5, 1.0, 2.0]
outs = [decode_latents(model, controlnet_to_image(model, [Control(net, hint, scale=s)], [PROMPT], cfg,
                                                  progress=False))[0] for s in scales]
change = [(out - outs[0]).abs().mean().item() for out in outs]
fig, axes = plt.subplots(1, len(scales) + 2, figsize=(2 * (len(scales) + 2), 2.4))
axes[0].plot(losses), axes[0].set_title("training loss", fontsize=8), axes[0].set_xlabel("step")
axes[1].imshow(hint[0].permute(1, 2, 0).numpy()), axes[1].set_title("hint", fontsize=8), axes[1].axis("off")
for ax, s, out, d in zip(axes[2:], scales, outs, change):
    ax.imshow(out.permute(1, 2, 0).numpy()), ax.axis("off"), ax.set_title(f"s = {s}: Δ {d:.3f}", fontsize=8)
fig.tight_layout(), fig.savefig("06-scale.png")
print("mean |image − image at s=0|:", [f"{d:.4f}" for d in change])
assert torch.equal(decode_latents(model, plain)[0], outs[0])  # s = 0 is the plain model
assert change[1] < change[2] < change[3]  # a larger scale moves the image further
wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(f"ran in {wall:.1f} s, {cpu:.1f} s of CPU (after the imports)")
