"""The memory bank of Super-AND, the released "non-parametric classifier" (docs/method.md, "Memory bank")."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """N x d bank of past embeddings; logits = features · memoryᵀ / τ.

    The bank is a buffer, a constant for autograd: the gradient of the features is
    grad_logits · memory / τ, exactly as in the released custom autograd function. It is float32
    when created and follows the module's dtype (``bank.double()`` keeps it in float64).

    Args:
        num_samples: N, training images.
        dim: d, embedding dimension.
        temperature: τ (npc_t, 0.1).
        momentum: m (npc_m, 0.5), weight of the old slot in the update.
    """

    def __init__(self, num_samples, dim, temperature=0.1, momentum=0.5):
        super().__init__()
        self.temperature = temperature
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3)
        # released: uniform in [-s, s], s = 1 / sqrt(d / 3); not normalized
        self.register_buffer("memory", torch.rand(num_samples, dim).mul_(2 * bound).add_(-bound))
        # released checkpoints store npc.params = tensor([τ, m])
        self.register_buffer("params", torch.tensor([temperature, momentum]))

    def forward(self, features):
        # (f / τ) · Mᵀ: the division on the (2B, d) side rather than on the (2B, N) result
        return (features / self.temperature) @ self.memory.T.to(features.dtype)  # (2B, N)

    @torch.no_grad()
    def update(self, indexes, features):
        """Slot i <- normalize(m · slot_i + (1 − m) · feature_i), once per image.

        ``features`` is (B, d), or the (2B, d) batch of both views: the released code writes both
        views into the same slot and the second view's write is the one that remains, so only the
        second half (view 2) is used. The new slots are computed in the bank's dtype: bfloat16
        features meet a float32 bank in float32, float64 features a float64 bank in float64.
        """
        if features.shape[0] == 2 * indexes.shape[0]:
            features = features[indexes.shape[0]:]
        old = self.memory.index_select(0, indexes)
        new = F.normalize(old * self.momentum + features.to(self.memory.dtype) * (1 - self.momentum), dim=1)
        self.memory.index_copy_(0, indexes, new)
