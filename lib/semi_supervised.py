"""The Π-model and Mean Teacher, the two semi-supervised methods of the paper's Table 4 (§4.4), applied to
the pretrained network "following the training details of the corresponding works" (docs/method.md,
"Semi-supervised methods (Table 4)").

- Π-model (Laine & Aila, "Temporal ensembling for semi-supervised learning", ICLR 2017): each image goes
  through the network twice (two augmentations, two dropout draws); the squared difference of the two
  softmax outputs is the unsupervised loss. Both passes carry gradient (their Algorithm 1 differentiates
  the whole loss).
- Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): the second output comes from a teacher whose weights
  are an exponential moving average of the student's (``ema_update``); the teacher gets no gradient (run
  it under ``torch.no_grad()``), and its accuracy is the one reported.

Both weight the unsupervised loss by w(t) = w_max · ``sigmoid_rampup(t)``. Labels enter only through the
classification term, and only for the rows the caller marks labelled: the functions take no labels for
unlabelled images at all.
"""
import math

import torch
import torch.nn.functional as F

RAMPUP_SHAPE = 5.0  # exp(−5 (1 − t)²): Laine & Aila (2017) §3 / appendix A; Tarvainen & Valpola (2017)
RAMPUP_EPOCHS = 80  # Laine & Aila (2017): w(t) ramps up over the first 80 epochs
EMA_DECAY_DURING_RAMPUP = 0.99  # Tarvainen & Valpola (2017): α during the ramp-up ...
EMA_DECAY_AFTER_RAMPUP = 0.999  # ... and for the rest of training


def sigmoid_rampup(epoch, rampup_length=RAMPUP_EPOCHS, shape=RAMPUP_SHAPE):
    """The "Gaussian" ramp-up exp(−shape · (1 − t)²), t = epoch / rampup_length clipped to [0, 1].

    Laine & Aila (2017) and Tarvainen & Valpola (2017), shape = 5: exp(−5) ≈ 0.0067 at epoch 0, 1 from
    ``rampup_length`` on. ``epoch`` may be fractional (a step inside an epoch, as Mean Teacher's code
    ramps per step). ``rampup_length`` 0 means no ramp-up (1 at once).
    """
    if rampup_length <= 0:
        return 1.0
    t = min(max(float(epoch) / float(rampup_length), 0.0), 1.0)
    return math.exp(-shape * (1.0 - t) ** 2)


def consistency_weight(epoch, max_weight, rampup_length=RAMPUP_EPOCHS, shape=RAMPUP_SHAPE):
    """w(t) = max_weight · sigmoid_rampup(epoch): the unsupervised loss's weight at ``epoch``.

    max_weight: w_max, each work's own (docs/method.md: Laine & Aila's Π-model 100 · M/N with M labelled
    of N training images; Mean Teacher's released code 100).
    """
    return float(max_weight) * sigmoid_rampup(epoch, rampup_length, shape)


def consistency_loss(logits, target_logits):
    """The squared difference of two softmax outputs, averaged over classes and over the batch.

    (1 / (C·B)) Σ_i ‖softmax(logits_i) − softmax(target_logits_i)‖²: the Π-model's unsupervised term
    (Laine & Aila 2017, Algorithm 1: w(t) · 1/(C|B|) Σ_i ‖z_i − z̃_i‖²) and Mean Teacher's consistency
    cost (their released code: the sum of squared differences divided by the class count, then by the
    batch size). Gradient flows into whichever input carries it: both passes for the Π-model, the
    student alone for Mean Teacher (the teacher's logits computed under ``torch.no_grad()``).

    Args:
        logits, target_logits: (B, C), computed in their dtype (float64 in, float64 out).
    Returns a scalar.
    """
    if logits.shape != target_logits.shape:
        raise ValueError(f"consistency between logits of shapes {tuple(logits.shape)} and "
                         f"{tuple(target_logits.shape)}")
    difference = F.softmax(logits, dim=1) - F.softmax(target_logits, dim=1)  # (B, C)
    return difference.pow(2).mean()


def semi_supervised_loss(logits, labels, target_logits, weight):
    """One step's loss of either method: cross-entropy on the labelled rows + w(t) · consistency on all rows.

    Laine & Aila (2017), Algorithm 1: −(1/|B|) Σ_{i ∈ B∩L} log z_i[y_i] + w(t) · consistency, the
    cross-entropy summed over the labelled images and divided by the *whole* batch size B (Mean Teacher's
    released code divides the same way); the consistency term covers every image, labelled or not.

    Args:
        logits: (B, C) the network's (student's) output on all B images, the L labelled ones first.
        labels: (L,) long, the labels of the first L rows only (L ≤ B; L = 0: no labelled image). The
            unlabelled rows' labels are never passed, so they cannot reach the loss.
        target_logits: (B, C) the second pass (Π-model) or the teacher's output (Mean Teacher).
        weight: w(t) (``consistency_weight``).
    Returns {"loss", "class", "consistency"}, scalars (the last two before weighting).
    """
    batch, labelled = logits.shape[0], labels.shape[0]
    if labelled > batch:
        raise ValueError(f"{labelled} labels for a batch of {batch} images")
    classification = F.cross_entropy(logits[:labelled], labels, reduction="sum") / batch
    consistency = consistency_loss(logits, target_logits)
    return {"loss": classification + weight * consistency, "class": classification, "consistency": consistency}


def pi_model_outputs(student, teacher, first, second):
    """Π-model: both views of every image through the student in one pass (two stochastic passes); view 2's
    outputs are the consistency targets, with gradient. Returns (logits, target logits), (B, C) each."""
    return student(torch.cat([first, second])).chunk(2)


def mean_teacher_outputs(student, teacher, first, second):
    """Mean Teacher: the student on view 1, the teacher on view 2 without gradient."""
    logits = student(first)
    with torch.no_grad():
        return logits, teacher(second)


# each semi-supervised method's two outputs, ``outputs(student, teacher, view 1, view 2)``, that
# ``semi_supervised_loss`` compares (the supervised method has no second output)
OUTPUTS = {"pi_model": pi_model_outputs, "mean_teacher": mean_teacher_outputs}


def ema_decay(epoch, rampup_length=RAMPUP_EPOCHS, during=EMA_DECAY_DURING_RAMPUP, after=EMA_DECAY_AFTER_RAMPUP):
    """Mean Teacher's α: ``during`` (0.99) while epoch < rampup_length, then ``after`` (0.999)
    (Tarvainen & Valpola 2017: the teacher follows the fast-changing early student more closely)."""
    return during if epoch < rampup_length else after


@torch.no_grad()
def ema_update(teacher, student, alpha):
    """θ' ← α θ' + (1 − α) θ for every parameter (Tarvainen & Valpola 2017, Eq. 1); buffers (BatchNorm's
    running statistics and counter) are copied from the student.

    ``teacher`` and ``student`` are modules of the same architecture (the teacher a deep copy of the
    student, its parameters with ``requires_grad`` off). Each parameter is updated as
    ``θ'·α + θ·(1 − α)``, two products and one sum, each rounded in the parameter's dtype.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the EMA decay α is in [0, 1], not {alpha}")
    teacher_parameters, student_parameters = dict(teacher.named_parameters()), dict(student.named_parameters())
    if teacher_parameters.keys() != student_parameters.keys():
        raise ValueError("the teacher and the student have different parameters")
    for name, parameter in teacher_parameters.items():
        parameter.mul_(alpha).add_(student_parameters[name] * (1.0 - alpha))
    student_buffers = dict(student.named_buffers())
    for name, buffer in teacher.named_buffers():
        buffer.copy_(student_buffers[name])
