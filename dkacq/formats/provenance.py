"""What produced a cache or a result: recorded beside it so a number can be traced and reproduced."""

from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("dkacq", "torch", "transformers", "peft", "lightning", "torchmetrics", "datasets", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions
