"""The losses of both stages, one function per equation of the paper: Eq. 1-3 in stage 1
(docs/method.md, "AND loss (Eq. 1)", "UE loss (Eq. 2)", "AUG loss (Eq. 3)"), Eq. 9 and Eq. 11 in
stage 2 ("Class-assignment loss (Eq. 9)", "Consistency-preserving loss (Eq. 11)").

Every function follows the released code's math, including which factors are detached, and
computes in the dtype of its inputs (float64 in, float64 out); ``aug_loss`` and ``iic_loss``
lift half-precision inputs to float32. Rows of a (2B, ·) input are the B first views followed by
the B second views.
"""
import sys

import torch
import torch.nn.functional as F


def and_loss(logits, indexes, neighbours, is_anchor):
    """AND loss (Eq. 1): −log p(own index) for non-anchors, −log(p(own) + Σ p(neighbours)) for anchors.

    Args:
        logits: (2B, N) memory-bank logits, view 1 rows first; p = softmax over N.
        indexes: (B,) dataset index of each image.
        neighbours: (B, ANs_size) long, the anchor neighbourhood of each image (ignored for non-anchors).
        is_anchor: (B,) bool.
    Returns the sum over the 2B rows divided by 2B.
    """
    rows = logits.shape[0]
    reps = rows // indexes.shape[0]
    cols = torch.cat([indexes.unsqueeze(1), neighbours], dim=1).repeat(reps, 1)  # (2B, 1 + k)
    selected = logits.gather(1, cols)
    keep = torch.ones_like(cols, dtype=torch.bool)
    keep[:, 1:] = is_anchor.repeat(reps).unsqueeze(1)
    selected = selected.masked_fill(~keep, float("-inf"))
    # log Σ_{j in neighbourhood} p_j = logsumexp(selected logits) − logsumexp(all logits)
    log_p = torch.logsumexp(selected, dim=1) - torch.logsumexp(logits, dim=1)
    return -log_p.sum() / rows


def aug_loss(features, temperature, neg_m=1.0):
    """Augmentation-invariance loss (Eq. 3; Eq. 11 in stage 2), in the released batch-criterion form.

    Rows are L2-normalized here; row i's partner is the other view of the same image (i ± B).
    With A_ij = exp(x_i · x̄_j / T) for j ≠ i (x̄ detached: gradients flow only through the left
    factor), pos_i = A_i,partner, D_i = Σ_j A_ij (neg_m = 1) or neg_m·(Σ_j A_ij − pos_i) + pos_i:
    loss = −[Σ_i log(pos_i / D_i) + neg_m · Σ_i Σ_{j ∉ {i, partner}} log(1 − A_ij / D_i)] / 2B.

    Args:
        features: (2B, D) rows to compare (the memory logits in stage 1, the embeddings in stage 2).
        temperature: T_b (batch_t, 0.1).
        neg_m: m_b (batch_m, 1), the weight of the negative pairs.
    """
    vectors = features.to(torch.promote_types(features.dtype, torch.float32))
    rows = vectors.shape[0]
    half = rows // 2
    partner = torch.arange(rows, device=vectors.device).add(half).remainder(rows)
    # x̂_i · x̂_j = x_i · x_j / (|x_i| |x_j|): normalizing after the product keeps the (2B, D) input
    # untouched (D = N in stage 1); the right factor, its norm included, is detached
    norm = vectors.norm(dim=1).clamp(min=1e-12)  # F.normalize's eps
    sim = (vectors @ vectors.detach().T) / (norm.unsqueeze(1) * norm.detach().unsqueeze(0) * temperature)  # (2B, 2B)
    eye = torch.eye(rows, dtype=torch.bool, device=vectors.device)
    all_prob = sim.exp().masked_fill(eye, 0.0)
    pos = all_prob.gather(1, partner.unsqueeze(1)).squeeze(1)  # (2B,)
    denom = all_prob.sum(1) if neg_m == 1 else (all_prob.sum(1) - pos) * neg_m + pos
    log_pos = torch.log(pos / denom)
    negatives = eye.clone()
    negatives[torch.arange(rows, device=vectors.device), partner] = True  # exclude self and partner
    log_neg = torch.log1p(-all_prob / denom.unsqueeze(1)).masked_fill(negatives, 0.0).sum(1)
    return -(log_pos.sum() + neg_m * log_neg.sum()) / rows


def ue_loss(logits, indexes, own_logit=-10.0):
    """Unification-entropy loss (Eq. 2): entropy of softmax(logits) with each row's own logit set to −10.

    Args:
        logits: (2B, N) memory-bank logits, view 1 rows first.
        indexes: (B,) dataset index of each image.
    Returns the sum of the 2B row entropies divided by 2B.
    """
    rows = logits.shape[0]
    own = indexes.repeat(rows // indexes.shape[0]).unsqueeze(1)
    masked = logits.scatter(1, own, own_logit)  # out-of-place: the original logits stay intact
    log_p = F.log_softmax(masked, dim=1)
    entropy = -(log_p.exp() * log_p).sum(1)
    return entropy.sum() / rows


def joint_distribution(joint, eps=sys.float_info.epsilon):
    """Eq. 9's P and its marginals from an unnormalized joint ``joint`` (C x C): Σ p1ᵀ p2 of one batch or
    of many. P is symmetrized, (P + Pᵀ)/2, and divided by its sum; the row and column marginals come from
    that unclamped P, then P and both marginals are clamped below at ``eps`` (the released code's in-place
    clamp, written without writing into expanded tensors). Returns (P, p_row (C, 1), p_col (1, C))."""
    joint = (joint + joint.T) / 2
    joint = joint / joint.sum()
    p_row = joint.sum(1, keepdim=True).clamp(min=eps)  # marginals come from the unclamped joint
    p_col = joint.sum(0, keepdim=True).clamp(min=eps)
    return joint.clamp(min=eps), p_row, p_col


def iic_loss(p1, p2, eps=sys.float_info.epsilon):
    """Class-assignment loss (Eq. 9, IIC): −I(z, z') from the joint distribution of two views.

    P = Σ_batch p1ᵀ p2 (C x C), symmetrized, divided by its sum and clamped with its marginals
    (``joint_distribution``); loss = −Σ P_cc' (log P_cc' − log P_c' − log P_c).

    Args:
        p1, p2: (B, C) class probabilities of the two views.
    """
    dtype = torch.promote_types(p1.dtype, torch.float32)
    joint, p_row, p_col = joint_distribution(p1.to(dtype).T @ p2.to(dtype), eps)  # (C, C), (C, 1), (1, C)
    return -(joint * (joint.log() - p_col.log() - p_row.log())).sum()
