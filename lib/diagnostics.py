"""The two terms of the class-assignment loss's mutual information, plotted apart in the paper's Fig. 4(a)
(docs/method.md, "The paper's experiments", "Fig. 4: the two entropies").

I(y, ŷ) = H(y) − H(y|ŷ), from the same joint distribution P that Eq. 9 (``lib.losses.iic_loss``) builds
from the two views' head outputs: H(y) = −Σ_c P_c log P_c, the entropy of the marginal (high: the images
spread over every cluster), and H(y|ŷ) = H(y, ŷ) − H(ŷ), the conditional entropy of an image's cluster
given its other view's (low: consistent assignments). Over an epoch, ``EpochEntropies`` sums the
unnormalized joint over the epoch's batches and computes both terms once at the end.
"""
import sys

import torch

from .losses import joint_distribution

EPS = sys.float_info.epsilon  # the clamp of Eq. 9 in the released code


def batch_joint(p1, p2):
    """Σ_batch p1ᵀ p2 (C x C), unnormalized and not yet symmetrized, in float64.

    Args:
        p1, p2: (B, C) class probabilities of the two views (rows: images).
    """
    return p1.detach().to(torch.float64).T @ p2.detach().to(torch.float64)


def joint_entropies(joint, eps=EPS):
    """(H(y), H(y|ŷ)) in nats from an unnormalized joint (C x C): summed p1ᵀ p2 of one batch or many.

    P and its marginals as Eq. 9 builds them (``lib.losses.joint_distribution``). H(y) = −Σ_c P_c log P_c (row
    marginal), H(y, ŷ) = −Σ P_cc' log P_cc', H(ŷ) = −Σ_c' P_c' log P_c' (column marginal; equal to the row
    marginal after the symmetrization), H(y|ŷ) = H(y, ŷ) − H(ŷ). Returns two 0-d tensors in the dtype of
    ``joint``.
    """
    joint, p_row, p_col = joint_distribution(joint, eps)  # (C, C), (C, 1), (1, C)
    h_y = -(p_row * p_row.log()).sum()
    h_joint = -(joint * joint.log()).sum()
    h_yhat = -(p_col * p_col.log()).sum()
    return h_y, h_joint - h_yhat


def assignment_entropies(p1, p2, eps=EPS):
    """(H(y), H(y|ŷ)) of one batch: ``joint_entropies`` of Σ_batch p1ᵀ p2. Where no entry of P or of its
    marginals falls below ``eps``, H(y) − H(y|ŷ) = −iic_loss(p1, p2) (to rounding)."""
    return joint_entropies(batch_joint(p1, p2), eps)


class EpochEntropies:
    """Fig. 4(a)'s two terms for one epoch and every head.

    ``update(outputs)`` after each step with the heads' outputs (a list of (2B, C) probability tensors,
    view 1 rows first, as ``MultiHeadNormFC`` gives them on the concatenated views) adds each head's
    Σ_batch p1ᵀ p2 to that head's running sum (float64, on the outputs' device, no host sync);
    ``compute()`` returns {"h_y": [one per head], "h_y_given_yhat": [...], "mutual_information": [...]}
    as floats (nats) from the summed joints; ``reset()`` starts the next epoch.
    """

    def __init__(self, eps=EPS):
        self.eps = eps
        self.joints = None

    def reset(self):
        self.joints = None

    def update(self, outputs):
        if torch.is_tensor(outputs):
            outputs = [outputs]
        batch = outputs[0].shape[0] // 2
        joints = [batch_joint(p[:batch], p[batch:]) for p in outputs]
        if self.joints is None:
            self.joints = joints
        else:
            if len(joints) != len(self.joints):
                raise ValueError(f"{len(joints)} heads given, {len(self.joints)} before")
            self.joints = [total + j for total, j in zip(self.joints, joints)]

    def compute(self):
        if self.joints is None:
            raise ValueError("no batch was added")
        terms = [joint_entropies(j, self.eps) for j in self.joints]
        h_y = [float(h) for h, _ in terms]
        h_cond = [float(c) for _, c in terms]
        return {"h_y": h_y, "h_y_given_yhat": h_cond,
                "mutual_information": [h - c for h, c in zip(h_y, h_cond)]}
