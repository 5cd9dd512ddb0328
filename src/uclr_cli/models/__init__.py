"""Pure building blocks: embeddings, the dual-stream autoencoder, LoRA. No I/O."""

from torch import Tensor, nn


def load_weights(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load ``tensors`` into ``module``; a missing, extra or misshapen one: ValueError naming it, one line."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:  # torch's message lists every mismatch over several lines: keep the last
        raise ValueError(str(e).strip().splitlines()[-1].strip()) from None
