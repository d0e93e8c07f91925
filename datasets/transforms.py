"""The two image transforms (docs/method.md, "Data and augmentation"): the training augmentation, drawn
independently for each view, and the deterministic evaluation transform. Both end in Normalize(mean, std)
with the data set's statistics (or those a caller passes, ``datasets.from_args(normalization=...)``).

The training augmentation has one per-data-set variant, named by the registry entry's ``augmentation``:
"flip" (the released one, every data set but SVHN) ends its geometric part with a random horizontal flip;
"affine" (SVHN, paper §4.4) replaces the flip by a small random affine transform, since a mirrored digit
is another symbol or none.
"""
from lib.errors import InputError

AUGMENTATIONS = ("flip", "affine")
# SVHN's affine (docs/method.md, "Semi-supervised methods (Table 4)"; the paper gives no ranges): a rotation
# small enough that no digit turns into another, and the ±2-pixel translation of the SVHN experiments of
# Laine & Aila (2017) and Tarvainen & Valpola (2017), as a fraction of the side; scale is already varied
# by RandomResizedCrop
AFFINE_DEGREES = 10.0
AFFINE_TRANSLATE = 2.0 / 32.0


def geometric(augmentation="flip"):
    """The per-data-set geometric step: "flip" (released) a random horizontal flip, "affine" (SVHN)
    ``RandomAffine`` in its place."""
    from torchvision import transforms  # here, not at import: torchvision costs a second or two to import

    if augmentation not in AUGMENTATIONS:
        raise InputError(f"unknown augmentation {augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if augmentation == "flip":
        return transforms.RandomHorizontalFlip()
    return transforms.RandomAffine(AFFINE_DEGREES, translate=(AFFINE_TRANSLATE, AFFINE_TRANSLATE),
                                   interpolation=transforms.InterpolationMode.BILINEAR)


def train_transform(mean, std, image_size=32, augmentation="flip"):
    """The training augmentation, drawn independently for each view (docs/method.md, "Data and augmentation").

    augmentation: "flip" (released) or "affine" (SVHN: ``RandomAffine`` in the flip's place, no flip).
    """
    from torchvision import transforms

    step = geometric(augmentation)
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomGrayscale(p=0.2),
        step,
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(mean, std, image_size=32):
    """The evaluation transform: shorter side to image_size, central square, ToTensor, Normalize."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize(mean, std)])


def for_views(views, mean, std, image_size=32, augmentation="flip"):
    """The training augmentation (the data set's variant) for two views, the evaluation transform for one."""
    if views == 2:
        return train_transform(mean, std, image_size, augmentation)
    return eval_transform(mean, std, image_size)
