"""Edits in the edit-friendly DDPM noise space (*An Edit Friendly DDPM Noise Space: Inversion and
Manipulations*, Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024): text-guided editing from the extracted
noise maps, alone or with Prompt-to-Prompt (editor), and the noise-space manipulations (noise_space). The
inversion itself, the extraction of the noise maps, is inversion/ddpm_noise.py."""
