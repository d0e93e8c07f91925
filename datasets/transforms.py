"""The two image transforms (docs/method.md, "Data and augmentation"): the training augmentation, drawn
independently for each view, and the deterministic evaluation transform. Both end in Normalize(mean, std)
with the data set's statistics (or those a caller passes, ``datasets.from_args(normalization=...)``)."""
from torchvision import transforms


def train_transform(mean, std, image_size=32):
    """The training augmentation, drawn independently for each view (docs/method.md, "Data and augmentation")."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(mean, std, image_size=32):
    """The evaluation transform: shorter side to image_size, central square, ToTensor, Normalize."""
    return transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize(mean, std)])


def for_views(views, mean, std, image_size=32):
    """The training augmentation for two views, the evaluation transform for one."""
    return train_transform(mean, std, image_size) if views == 2 else eval_transform(mean, std, image_size)
