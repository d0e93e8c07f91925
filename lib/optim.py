"""The optimizer of both stages (docs/method.md, "Optimizer and schedules")."""
import torch


def sgd_optimizer(net, lr, momentum, weight_decay):
    """SGD with Nesterov momentum and weight decay on every trainable parameter of ``net``.

    Every parameter with ``requires_grad`` is trained, BatchNorm's weights and biases included;
    the fixed Sobel layers of the backbone and the frozen stage-2 heads (Eq. 13) have
    ``requires_grad`` False and stay out, even when they sit inside ``net``.

    Args:
        net: the module whose trainable parameters are optimized.
        lr: the base learning rate (0.03 in stage 1, 0.01 in stage 2); the schedule resets it
            every epoch (``lib.schedules.step_lr``).
        momentum: 0.9 in both stages.
        weight_decay: 5e-4 in both stages.
    """
    trainable = [parameter for parameter in net.parameters() if parameter.requires_grad]
    return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
