"""Stage-2 class-assignment heads (paper Eq. 13; docs/method.md, "Heads (Eq. 13)"): frozen, normalized FC layers
(or, for the ablation of Table 3, frozen FC layers without the normalization)."""
import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("released", "paper", "none")  # how W is normalized: per feature row, per class column, not at all


class NormFC(nn.Module):
    """One frozen head: softmax(v · Ŵ / τ_c), W of shape (in_dim, num_classes) drawn from N(0, 1).

    Args:
        norm: 'released' normalizes each ROW of W (one feature dimension across classes), which is
            what produced the published numbers; 'paper' normalizes each class column (Eq. 13); 'none'
            uses the drawn W as it is (Table 3, "without weight normalization": softmax(v · W / τ_c)).
    """

    def __init__(self, in_dim, num_classes, temperature=0.1, norm="released"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, not {norm!r}")
        self.temperature = temperature
        self.norm = norm
        self.weight = nn.Parameter(torch.randn(in_dim, num_classes), requires_grad=False)

    def normalized_weight(self):
        if self.norm == "none":
            return self.weight
        # released code normalizes rows, not classes (Eq. 13 normalizes the class columns)
        return F.normalize(self.weight, dim=1 if self.norm == "released" else 0)

    def forward(self, features):
        weight = self.normalized_weight().to(features.dtype)
        return F.softmax(features @ weight / self.temperature, dim=1)  # (B, num_classes)


class MultiHeadNormFC(nn.Module):
    """``num_heads`` independent frozen NormFC heads; ``forward`` returns one probability tensor per head.

    Args:
        in_dim: d, the embedding dimension.
        num_classes: C, the number of clusters (= classes).
        temperature: τ_c in Eq. 13 (0.1).
        norm: 'released' (rows of W), 'paper' (columns of W, Eq. 13) or 'none' (W as drawn).
    """

    def __init__(self, in_dim, num_classes, num_heads=5, temperature=0.1, norm="released"):
        super().__init__()
        self.heads = nn.ModuleList(
            NormFC(in_dim, num_classes, temperature, norm) for _ in range(num_heads))

    def forward(self, features):
        return [head(features) for head in self.heads]
