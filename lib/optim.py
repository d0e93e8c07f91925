"""The optimizer of both stages (paper §4.1; docs/method.md, "Optimizer and schedules")."""
import torch


def sgd_optimizer(net, lr, momentum, weight_decay):
    """SGD with Nesterov momentum and weight decay on every trainable parameter of ``net``: the frozen
    Sobel layers and heads have requires_grad False and stay out."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
