"""Model factories the service tests pass to `--model-factory` (and build in-process for the reference).

The draft is a perturbed copy of the target, so speculative rounds see both acceptances and rejections."""
from tests.tiny_models import correlated_draft, tiny_llama


def target(seed: int = 0):
    return tiny_llama(seed=seed)


def draft(seed: int = 0, noise: float = 0.3):
    return correlated_draft(tiny_llama(seed=seed), noise=noise)


def worker_draft_settings() -> dict:
    """dyspec.generate keyword arguments that draft exactly as a default draft worker does (same
    temperature and truncation), so in-process runs grow the worker's trees."""
    from draft_service.config import DraftConfig

    d = DraftConfig(target_address="unused").draft_sampling
    return dict(draft_temperature=d.temperature, draft_top_k=d.top_k, draft_top_p=d.top_p)


def slow_target(seed: int = 0, forward_s: float = 0.5):
    """The target, with every forward taking at least `forward_s` longer: rounds long enough for a
    test to cancel, break or kill something while one runs on the model thread."""
    import time

    model = target(seed)
    model.register_forward_pre_hook(lambda module, args: time.sleep(forward_s))
    return model
