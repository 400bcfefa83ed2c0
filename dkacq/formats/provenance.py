"""What produced a cache or a result: recorded beside it so a number can be traced and reproduced."""

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = ("dkacq", "torch", "transformers", "peft", "lightning", "torchmetrics", "datasets", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def hardware(device: torch.device, devices: int) -> dict:
    """The device a run used (its name, how many) and the peak memory it took there: with the wall
    time, what makes a run's speed comparable with another's."""
    if device.type == "cuda":
        name, peak = torch.cuda.get_device_name(device), torch.cuda.max_memory_allocated(device)
    else:
        name, peak = platform.processor() or platform.machine(), _peak_rss()
    return {"device": name, "device_type": device.type, "devices": devices, "peak_memory_bytes": int(peak)}


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
