"""Speed switches around the UNet call that leave the model's arithmetic alone.

- ``backend_settings(device)``: the ``torch.backends`` flags chosen per device. On a GPU: cuDNN picks the
  fastest convolution algorithm for the (fixed) shapes of a sampling run, and fp32 matrix products and
  convolutions may use TF32 (fp16/bf16 runs are unaffected; fp32 ones round to ~1e-3). On the CPU the
  defaults stay (oneDNN on): there is nothing to choose.
- ``CudaGraphUNet``: the UNet call recorded once as a CUDA graph and replayed every step, so the ~1,000
  kernel launches of one SD 1.5 step cost one launch. A graph replays exactly the kernels it recorded, so it
  needs a CUDA device, fixed shapes, and no attention hooks (their per-step choices run in Python); each
  of these is a clear error, never a silent fallback.

Fused projections (``UNet.fuse_projections``) and channels_last (``UNet.use_channels_last``) live on the
UNet; ``StableDiffusion.load`` turns both on and keeps the VAE in fp32 whatever the dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention_layers

CUDA_SETTINGS = {
    "cudnn.benchmark": True,  # fixed shapes for a whole run: time the algorithms once, keep the fastest
    "cudnn.allow_tf32": True,  # fp32 convolutions on tensor cores (no effect on fp16/bf16)
    "cuda.matmul.allow_tf32": True,  # fp32 matrix products on tensor cores (no effect on fp16/bf16)
}


def backend_settings(device: str | torch.device) -> dict[str, bool]:
    """The ``torch.backends`` flags for ``device`` ({} on the CPU: its defaults are already the fast ones)."""
    return dict(CUDA_SETTINGS) if torch.device(device).type == "cuda" else {}


def _flag(name: str):
    module_path, attribute = name.rsplit(".", 1)
    module = torch.backends
    for part in module_path.split("."):
        module = getattr(module, part)
    return module, attribute


def apply_backend_settings(device: str | torch.device) -> dict[str, bool]:
    """Set the flags for ``device``; returns the previous values (``restore_backend_settings`` undoes it)."""
    previous = {}
    for name, value in backend_settings(device).items():
        module, attribute = _flag(name)
        previous[name] = getattr(module, attribute)
        setattr(module, attribute, value)
    return previous


def restore_backend_settings(previous: dict[str, bool]) -> None:
    for name, value in previous.items():
        module, attribute = _flag(name)
        setattr(module, attribute, value)


class CudaGraphUNet(nn.Module):
    """``unet(x, t, context)`` replayed from a CUDA graph recorded on the first call (and re-recorded
    when the shapes change). Attributes not found here are the wrapped UNet's."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        device = next(unet.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"--cuda-graph needs the model on a CUDA device (it is on {device}); "
                             "drop --cuda-graph or use --device cuda")
        self.unet = unet
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, timestep, context: torch.Tensor, down_residuals=None, mid_residual=None):
        if down_residuals is not None or mid_residual is not None:
            raise ValueError("--cuda-graph records the plain UNet call; ControlNet residuals are not part of it "
                             "(drop --cuda-graph for ControlNet)")
        hooked = [name for name, layer in attention_layers(self.unet).items() if layer.hooks]
        if hooked:
            raise ValueError(f"--cuda-graph cannot replay attention hooks (attached to {hooked[0]} and "
                             f"{len(hooked) - 1} more layers): their per-step choices run in Python; drop "
                             "--cuda-graph for editing methods")
        t = torch.as_tensor(timestep, device=x.device).reshape(-1)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), tuple(context.shape), context.dtype)
        if key != self.key:
            self._record(x, t, context)
            self.key = key
        for static, new in zip(self.inputs, (x, t, context)):
            static.copy_(new)
        self.graph.replay()
        return self.output.clone()

    def _record(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        self.inputs = [x.clone(), t.clone(), context.clone()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph (cuDNN autotuning, lazy allocations)
            for _ in range(3):
                self.unet(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.unet(*self.inputs)
