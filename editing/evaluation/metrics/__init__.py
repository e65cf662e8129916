"""Metrics of one edit, and the suite that computes every metric a case and its output allow.

| name | what | needs |
|---|---|---|
| bg_mse, bg_psnr, bg_ssim | preservation outside the edit mask (pixels.py) | a mask |
| bg_lpips | LPIPS outside the edit mask (lpips.py) | --lpips backbone file |
| structure | DINO self-similarity distance to the source (dino.py) | --dino file |
| clip_whole, clip_edited | CLIP score to the target prompt, whole / edit region (clip.py) | --clip file |
| clip_direction, clip_image | InstructPix2Pix's directional and image similarity | --clip file |
| gt_l1, gt_l2, gt_clip_i, gt_dino | MagicBrush's scores against the ground truth | a ground truth (+ CLIP / DINO) |
| target_psnr, edit_accuracy, edit_success, kept_accuracy, object_iou | toy: exact target, readers (toy.py) | toy |
| recon_psnr | inversion methods: PSNR of the regenerated source | the method |
| canny_f1, hint_iou | ControlNet condition fidelity: Canny F1 (control.py), hint object IoU (toy) | controlnet |
| style_clip_i, style_clip_t | IP-Adapter / InstantStyle: CLIP to the style image vs to the prompt | --clip file |

A metric that cannot be computed is recorded with its reason (the file it needs, "no background pixels"),
never as a number. PSNR of identical images is ∞; it is recorded as 100 dB (ControlNet++'s convention).
``compat`` switches to PIE-Bench's conventions (docs/evaluation.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .pixels import background_metrics, l1, mse, psnr

PSNR_CAP = 100.0
LPIPS_FILE = "torchvision's squeezenet1_1-b8a52dc0.pth (or alexnet/vgg16)"
DINO_FILE = "a DINO ViT checkpoint such as dino_vitbase8_pretrain.pth"
CLIP_FILE = "CLIP weights (ViT-L/14 .safetensors, or the toy CLIP)"


@dataclass
class MetricSuite:
    clip: Path | None = None
    clip_config: Path | None = None
    dino: Path | None = None
    lpips: Path | None = None
    compat: bool = False
    _nets: dict = field(default_factory=dict)

    def load(self) -> None:
        """Load every network given; a given file that is missing or unreadable is an error (one line)."""
        if self.lpips is not None:
            from .lpips import load_lpips

            self._nets["lpips"] = load_lpips(self.lpips)
        if self.dino is not None:
            from .dino import load_dino

            self._nets["dino"] = load_dino(self.dino)
        if self.clip is not None:
            from ldm.clip_models import load_clip

            if not Path(self.clip).is_file():
                raise FileNotFoundError(f"--clip {self.clip}: no such file ({CLIP_FILE})")
            self._nets["clip"] = load_clip(self.clip, self.clip_config, text_tower=True)

    def missing(self) -> dict[str, str]:
        """Metric group -> why it is not computed in this run."""
        reasons = {}
        if "lpips" not in self._nets:
            reasons["lpips"] = f"not computed: needs --lpips FILE ({LPIPS_FILE})"
        if "dino" not in self._nets:
            reasons["dino"] = f"not computed: needs --dino FILE ({DINO_FILE})"
        if "clip" not in self._nets:
            reasons["clip"] = f"not computed: needs --clip FILE ({CLIP_FILE})"
        return reasons

    def score(self, case, output) -> tuple[dict[str, float], dict[str, str]]:
        """(values, not_computed reasons) of one method output on one case."""
        values: dict[str, float] = {}
        skipped: dict[str, str] = {}
        image, source, mask = output.image.float(), case.image.float(), case.mask
        missing = self.missing()

        def put(name, value, reason="NaN: no unedited pixels (the mask covers the image)"):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                skipped[name] = reason
            else:
                values[name] = min(float(value), PSNR_CAP) if name.endswith("psnr") else float(value)

        if mask is not None:
            for name, value in background_metrics(image, source, mask, self.compat).items():
                put(name, value)
        else:
            for name in ("bg_mse", "bg_psnr", "bg_ssim", "bg_lpips"):
                skipped[name] = "not computed: the case has no edit mask"
        if mask is not None:
            if "lpips" in self._nets:
                from .lpips import background_lpips

                put("bg_lpips", background_lpips(self._nets["lpips"], image, source, mask, self.compat))
            else:
                skipped["bg_lpips"] = missing["lpips"]
        if output.reconstruction is not None:
            put("recon_psnr", psnr(output.reconstruction.float(), source))
        if case.target is not None:
            put("gt_l1", l1(image, case.target))
            put("gt_l2", mse(image, case.target))
        if case.target_attributes:
            from .toy import toy_metrics

            for name, value in toy_metrics(case, image).items():
                put(name, value)
            if case.kind not in ("colour", "shape", "background"):
                reason = f"not computed: no reader for {case.kind} edits"
                skipped["edit_accuracy"] = skipped["edit_success"] = reason
        self._dino(case, image, source, put, skipped, missing)
        self._clip(case, output, image, source, put, skipped, missing)
        if output.hint_edges is not None:
            from .control import canny_f1

            put("canny_f1", canny_f1(image, output.hint_edges, output.canny_config))
        if output.hint_edges is not None or output.hint_mask is not None:
            from .toy import hint_iou

            if case.source_object_mask is not None:
                put("hint_iou", hint_iou(image, case.source_object_mask))
            else:
                skipped["hint_iou"] = "not computed: the case has no object mask (toy-edits cases only)"
        return values, skipped

    def _dino(self, case, image, source, put, skipped, missing) -> None:
        names = ["structure"] + (["gt_dino"] if case.target is not None else [])
        if "dino" not in self._nets:
            skipped.update({name: missing["dino"] for name in names})
            return
        from .dino import dino_similarity, structure_distance

        put("structure", structure_distance(self._nets["dino"], image, source, self.compat))
        if case.target is not None:
            put("gt_dino", dino_similarity(self._nets["dino"], image, case.target.float()))

    def _clip(self, case, output, image, source, put, skipped, missing) -> None:
        names = ["clip_whole"] + (["clip_edited"] if case.mask is not None else [])
        names += ["clip_direction", "clip_image"] if case.source_prompt else []
        names += ["gt_clip_i"] if case.target is not None else []
        names += ["style_clip_i", "style_clip_t"] if output.style_image is not None else []
        if "clip" not in self._nets:
            skipped.update({name: missing["clip"] for name in names})
            return
        import torch

        from .clip import clip_score, cosine, direction_similarity, image_embeddings, region_image, text_embeddings

        model = self._nets["clip"]
        images = [image, source] + ([case.target.float()] if case.target is not None else [])
        embedded = list(image_embeddings(model, torch.stack(images)))
        texts = text_embeddings(model, [case.target_prompt, case.source_prompt or case.target_prompt])
        put("clip_whole", clip_score(embedded[0], texts[0]))
        if case.mask is not None:
            if case.mask.any():
                region = region_image(image, case.mask, self.compat)
                put("clip_edited", clip_score(image_embeddings(model, region[None])[0], texts[0]))
            else:
                skipped["clip_edited"] = "not computed: the edit mask is empty"
        if case.source_prompt:
            put("clip_direction", direction_similarity(embedded[1], embedded[0], texts[1], texts[0]))
            put("clip_image", cosine(embedded[1], embedded[0]))
        if case.target is not None:
            put("gt_clip_i", cosine(embedded[0], embedded[2]))
        if output.style_image is not None:
            style = image_embeddings(model, output.style_image.float()[None])[0]
            put("style_clip_i", cosine(embedded[0], style))
            put("style_clip_t", clip_score(embedded[0], texts[0]))
