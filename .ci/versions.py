"""Print the resolved versions of the packages whose numerics the suite compares against."""

from importlib import metadata
import platform

for name in ("torch", "torchvision", "diffusers", "transformers", "open-clip-torch", "numpy", "safetensors", "pillow"):
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = "not installed"
    print(f"{name:>16} {version}")
print(f"{'python':>16} {platform.python_version()} on {platform.machine()}")
