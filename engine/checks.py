"""The checks of a ``--resume`` file against a script's flags: one clear error line for a file of another
stage, data set, size or shape, rather than a mismatch deep inside ``load_state_dict``."""
import torch

import datasets
from lib.checkpoint import checkpoint_stage
from lib.errors import InputError

from .lifecycle import require_keys

# what a resumable file holds beyond the released keys (engine.lifecycle.training_state and the position)
STAGE1_TRAINING_KEYS = ("optimizer", "rng", "args", "round", "epoch", "next.round", "next.epoch")
STAGE2_TRAINING_KEYS = ("optimizer", "rng", "args", "epoch", "next_epoch", "best_loss", "best_epoch")


def stage1_checkpoint(ckpt, path, args, num_samples):
    """super_and.py: a stage-1 file of this data set, its ``num_samples`` training images and --low_dim;
    with training state unless --test_only."""
    stage = checkpoint_stage(ckpt)
    if stage != 1:
        other = "'main.py --test_only --resume'" if stage == 2 else "'semi.py --test_only --resume'"
        raise InputError(f"{path} is a stage-{stage} checkpoint; evaluate it with {other}, or pass a "
                         "ckpt_embed.t7 here")
    require_keys(ckpt, path, ["npc.memory"])
    saved = ckpt.get("args", {}).get("dataset")
    if saved is not None and saved != args.dataset:
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")
    memory = ckpt["npc"]["memory"]
    if memory.shape[1] != args.low_dim:
        raise InputError(f"{path} has a {memory.shape[1]}-dimensional memory bank; pass --low_dim {memory.shape[1]}")
    if memory.shape[0] != num_samples:
        raise InputError(f"{path} has a memory bank of {memory.shape[0]} images but the {args.dataset} "
                         f"training split here has {num_samples}; check --dataset and --subset")
    if not args.test_only and "next" not in ckpt:  # released files: their broken resume is not reproduced
        raise InputError(f"{path} holds no training state (a released or converted file): evaluate it with "
                         "--test_only, or start stage 2 from it with main.py --resume")
    if not args.test_only:
        require_keys(ckpt, path, STAGE1_TRAINING_KEYS)
    if not torch.isfinite(memory).all():
        raise InputError(f"{path} holds a non-finite memory bank; it cannot be evaluated or continued")


def stage2_checkpoint(ckpt, path, args, num_classes):
    """main.py: a stage-1 file to start from or a stage-2 file of the same images, with heads of --num_heads,
    ``num_classes`` clusters and --low_dim; with training state to continue it, heads to evaluate it."""
    saved, stage = ckpt.get("args", {}).get("dataset"), checkpoint_stage(ckpt)
    if saved is not None and not datasets.same_images(saved, args.dataset):
        raise InputError(f"{path} was trained on {saved}, not --dataset {args.dataset}")
    if stage == 2:
        shapes = [tuple(v.shape) for k, v in sorted(ckpt["fc"].items()) if k.endswith(".weight")]
        if not shapes:
            raise InputError(f"{path} holds no head weights under 'fc'")
        if len(shapes) != args.num_heads:
            raise InputError(f"{path} has {len(shapes)} heads; pass --num_heads {len(shapes)}")
        dim, classes = shapes[0]
        if classes != num_classes:
            raise InputError(f"{path} has heads for {classes} clusters but --dataset {args.dataset} has "
                             f"{num_classes} classes; check --dataset (or --num_classes)")
        if dim != args.low_dim:
            raise InputError(f"{path} has heads for {dim}-dimensional embeddings; pass --low_dim {dim}")
    if args.test_only and stage != 2:
        raise InputError(f"{path} is a stage-{stage} checkpoint with no heads to evaluate: train stage 2 from it "
                         f"with 'main.py --resume {args.resume}', or use super_and.py --test_only")
    if not args.test_only and stage == 2 and "next_epoch" not in ckpt:
        raise InputError(f"{path} holds no training state (a released file or a best-epoch file): evaluate it "
                         "with --test_only, or continue from ckpt_ul_last.t7")
    if not args.test_only and stage == 2:
        require_keys(ckpt, path, STAGE2_TRAINING_KEYS)
