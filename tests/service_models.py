"""Model factories the service tests pass to `--model-factory` (and build in-process for the reference).

The draft is a perturbed copy of the target, so speculative rounds see both acceptances and rejections."""
from tests.tiny_models import correlated_draft, tiny_llama


def target(seed: int = 0):
    return tiny_llama(seed=seed)


def draft(seed: int = 0, noise: float = 0.3):
    return correlated_draft(tiny_llama(seed=seed), noise=noise)
