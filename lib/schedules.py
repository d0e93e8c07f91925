"""Per-epoch schedules of the released code, as functions of the epoch within a round
(docs/method.md, "Optimizer and schedules", "UE loss (Eq. 2)", "Anchor neighbourhoods"), and semi.py's."""


def scaled(epochs, scale=1.0):
    """An epoch of the released schedules at ``scale`` (``--schedule_scale``; 1: as released): rounded, at least
    1, so that a run of ``scale`` times the released length passes through every phase of the schedule."""
    return epochs if scale == 1 else max(1, round(epochs * scale))


def step_lr(epoch, base_lr, scale=1.0):
    """base_lr for epoch < 80, then base_lr · 0.1^((epoch − 80) // 40); at ``scale``, 80 and 40 times ``scale``.

    Exactly the released formula: epochs 80-119 still use base_lr, the first decay is at 120.
    """
    start, every = scaled(80, scale), scaled(40, scale)
    return base_lr if epoch < start else base_lr * 0.1 ** ((epoch - start) // every)


def semi_lr(epoch, base_lr, start=80, every=40):
    """Few-label training's (semi.py): base_lr before ``start``, then x0.1 at ``start`` and every ``every``
    epochs after it (80, 120, 160)."""
    return base_lr if epoch < start else base_lr * 0.1 ** (1 + (epoch - start) // every)


def ue_weight(epoch, scale=1.0):
    """w of the UE loss (Eq. 2): 0.2 · floor(epoch / 80), so UE is off for the first 80 epochs of each round;
    at ``scale``, 80 times ``scale``."""
    return 0.2 * (epoch // scaled(80, scale))


def num_anchors(num_samples, select_rate, round_index):
    """floor(N · ANs_select_rate · round): round 0 has none, and the anchors grow every round.

    The product is taken in floating point and truncated, as in the released code.
    """
    return int(num_samples * select_rate * round_index)
