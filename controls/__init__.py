"""Conditioning added to a Stable Diffusion UNet.

- ControlNet (*Adding Conditional Control to Text-to-Image Diffusion Models*, Zhang, Rao, Agrawala): the model
  (controlnet), sampling with it (guidance), hints (canny, hints) and training (train).
- IP-Adapter, the image prompt (ip_adapter), and its training (ip_adapter_train).
- InstructPix2Pix's image conditioning and three-way guidance (image_condition).
"""

from .canny import CannyConfig, canny
from .controlnet import ControlNet, ControlNetConfig, HintEncoder, zero_conv
from .guidance import Control, control_residuals, controlled_unet, controlnet_to_image, guess_mode_scales
from .hints import canny_hint, control_size, resize_for_control, to_hint

__all__ = ["CannyConfig", "canny", "ControlNet", "ControlNetConfig", "HintEncoder", "zero_conv", "Control",
           "control_residuals", "controlled_unet", "controlnet_to_image", "guess_mode_scales", "canny_hint",
           "control_size", "resize_for_control", "to_hint"]
