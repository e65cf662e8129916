"""Stable Diffusion 1.x/2.x written out: configs, attention, UNet, VAE, CLIP text encoder, schedulers and the
sampling pipeline."""
