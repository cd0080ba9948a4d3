"""Model factories the service tests pass to `--model-factory` (and build in-process for the reference).

The draft is a perturbed copy of the target, so speculative rounds see both acceptances and rejections."""
from tests.tiny_models import correlated_draft, tiny_llama


def target(seed: int = 0):
    return tiny_llama(seed=seed)


def draft(seed: int = 0, noise: float = 0.3):
    return correlated_draft(tiny_llama(seed=seed), noise=noise)


def grid_target(seed: int = 0):
    """The target with every linear weight on int4's 4-bit grid (as GGUF Q4 weights are): served as a
    target, and as an --dtype int4 draft, which then differs from it by its activations' rounding
    alone (a random tiny draft rounded to 4 bits would get next to nothing accepted)."""
    import torch

    from engine.int4_draft import dequantise, int4_groups

    model = target(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantise(*int4_groups(module.weight), module.in_features))
    return model


def worker_draft_settings() -> dict:
    """dyspec.generate keyword arguments that draft exactly as a default draft worker does (same
    temperature and truncation), so in-process runs grow the worker's trees."""
    from draft_service.config import DraftConfig

    d = DraftConfig(target_address="unused").draft_sampling
    return dict(draft_temperature=d.temperature, draft_top_k=d.top_k, draft_top_p=d.top_p)


def _slowed(model, forward_s: float):
    """`model` with every forward taking at least `forward_s` longer (a sleep before it runs)."""
    import time

    model.register_forward_pre_hook(lambda module, args: time.sleep(forward_s))
    return model


def slow_target(seed: int = 0, forward_s: float = 0.5):
    """The target with slow forwards: rounds long enough for a test to cancel, break or kill
    something while one runs on the model thread."""
    return _slowed(target(seed), forward_s)


def slow_draft(seed: int = 0, noise: float = 0.3, forward_s: float = 0.1):
    """The draft with slow forwards: a worker spends most of each round drafting, so the target
    sits idle between rounds (where a target that dies is found by the next write, not a read)."""
    return _slowed(draft(seed, noise), forward_s)
