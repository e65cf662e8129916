"""InstructPix2Pix (*InstructPix2Pix: Learning to Follow Image Editing Instructions*, Brooks, Holynski, Efros,
CVPR 2023): the editor (editor), input sizing (sizing), the scale grid of ``editlab ip2p`` (grid), making
before/after training pairs with Prompt-to-Prompt (pairs; toy-world captions and filters in toy_pairs; split
across processes and resumable in pair_runs), the
pair datasets (data) and fine-tuning (train). The 8-channel image conditioning and the three-way guidance the
editor samples with live in controls/image_condition.py, where Visii's loss can use them too."""
