"""coinfer: erasure-coded neural network inference.

Public API (stable):

* :class:`Code` — the systematic (k + r, k) code over model outputs and its decoder.
* :func:`diagonal_fisher` — diagonal Fisher information (exact / sampled / empirical).
* :func:`encode` — build the r coded models (``coin``, ``average``, ``distill``).
* :class:`Bundle` — the deployable directory of models, code and manifest.
* :func:`predict_probs` — a model's batched softmax outputs.

The evaluation harness (datasets, scenarios, training, experiments, reports)
lives in :mod:`coinfer.experiments` and uses only this API.
"""

from coinfer.architectures import ARCHITECTURES, build_model
from coinfer.bundle import Bundle
from coinfer.code import Code, project_simplex
from coinfer.encoders import METHODS, EncodeResult, encode
from coinfer.errors import (
    ArchitectureError,
    BundleError,
    CalibrationError,
    CodeError,
    CoinferError,
    DataError,
    DecodeError,
    ModelMismatchError,
    OptionError,
)
from coinfer.fisher import diagonal_fisher
from coinfer.predict import predict_probs

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchitectureError",
    "Bundle",
    "BundleError",
    "CalibrationError",
    "Code",
    "CodeError",
    "CoinferError",
    "DataError",
    "DecodeError",
    "EncodeResult",
    "METHODS",
    "ModelMismatchError",
    "OptionError",
    "build_model",
    "diagonal_fisher",
    "encode",
    "predict_probs",
    "project_simplex",
    "__version__",
]


def __getattr__(name: str):
    # the serving client is imported lazily: it pulls in httpx
    if name == "Client":
        from coinfer.serving.client import Client

        return Client
    raise AttributeError(f"module 'coinfer' has no attribute {name!r}")
