"""Per-epoch schedules of the released code, as functions of the epoch within a round
(docs/method.md, "Optimizer and schedules", "UE loss (Eq. 2)", "Anchor neighbourhoods")."""


def step_lr(epoch, base_lr):
    """base_lr for epoch < 80, then base_lr · 0.1^((epoch − 80) // 40).

    Exactly the released formula: epochs 80-119 still use base_lr, the first decay is at 120.
    """
    return base_lr if epoch < 80 else base_lr * 0.1 ** ((epoch - 80) // 40)


def ue_weight(epoch):
    """w of the UE loss (Eq. 2): 0.2 · floor(epoch / 80), so UE is off for the first 80 epochs of each round."""
    return 0.2 * (epoch // 80)


def num_anchors(num_samples, select_rate, round_index):
    """floor(N · ANs_select_rate · round): round 0 has none, and the anchors grow every round.

    The product is taken in floating point and truncated, as in the released code.
    """
    return int(num_samples * select_rate * round_index)
