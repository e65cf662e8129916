"""Prompt-to-Prompt (Hertz et al., ICLR 2023): edit generated or inverted images by controlling attention.

- alignment.py: token alignment (word swap mapper, Needleman–Wunsch refinement, words -> tokens)
- schedules.py: cross/self replacement schedules and UNet levels
- controllers.py: Replace, Refine, Reweight and the P2PController attention hook
- store.py: AttentionStore (running sums of cross-attention maps)
- local_blend.py: LocalBlend
- visualize.py: labelled per-token attention grid
- edit.py: prompt_to_prompt, edit_real_image
"""

from .alignment import equalizer, needleman_wunsch, refinement_mapper, replacement_mapper, token_ids
from .controllers import P2PController, Refine, Replace, Reweight
from .edit import (MODES, REAL_IMAGE_CONFIG, Inversion, P2PConfig, P2PResult, build_controller, edit_real_image,
                   invert_image, prompt_to_prompt, resolve_self_level)
from .local_blend import LocalBlend
from .schedules import cross_replace_alphas, default_map_level, level_shape, self_replace_calls
from .store import AttentionStore
from .visualize import attention_grid, token_labels

__all__ = ["AttentionStore", "Inversion", "LocalBlend", "MODES", "REAL_IMAGE_CONFIG", "P2PConfig", "P2PController",
           "P2PResult", "Refine", "Replace", "Reweight", "attention_grid", "build_controller", "cross_replace_alphas",
           "default_map_level", "edit_real_image", "equalizer", "invert_image", "level_shape",
           "needleman_wunsch", "prompt_to_prompt", "refinement_mapper", "replacement_mapper",
           "resolve_self_level", "self_replace_calls", "token_ids", "token_labels"]
