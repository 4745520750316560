"""Help texts shared by the CLI commands that load a bundle (``predict``,
``inspect``, ``serve``), so that every one states the trust model alike."""

from __future__ import annotations

__all__ = ["TRUST_CODE_HELP", "MAX_CONDITION_HELP"]

TRUST_CODE_HELP = (
    "Allow a bundle whose architecture is code (package.module:factory): loading imports that "
    "module and calls the factory with the manifest's kwargs. Only for bundles you trust; "
    "registered architectures (mlp, lenet5, resnet20) need no opt-in."
)
MAX_CONDITION_HELP = (
    "Largest decoding condition number accepted (default 1e6, at most 1e12); a bundle's recorded "
    "limit can only lower it."
)
