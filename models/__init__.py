from . import resnet
from .heads import MultiHeadNormFC, NormFC
from .resnet import SobelResNet, resnet18, resnet101
from .wideresnet import WideResNet, wrn28_2

# every backbone by its --network name: the two-trunk ResNets, and the semi-supervised experiments' WRN-28-2
NETWORKS = {**resnet.NETWORKS, "wrn28_2": wrn28_2}

__all__ = ["MultiHeadNormFC", "NormFC", "NETWORKS", "SobelResNet", "WideResNet", "resnet18", "resnet101", "wrn28_2"]
