from .heads import MultiHeadNormFC, NormFC
from .resnet import NETWORKS, SobelResNet, resnet18, resnet101

__all__ = ["MultiHeadNormFC", "NormFC", "NETWORKS", "SobelResNet", "resnet18", "resnet101"]
