"""Checkpoints: atomic writes, safe loads (``weights_only=True``), the layout of the released files.

The keys of both stages' files, released and ours: docs/method.md, "Checkpoint formats".
"""
import io
import os
import pickle
import warnings
import zipfile

import torch

from .errors import InputError

PREFIX = "module."  # released files were saved from a DataParallel wrapper


def save_checkpoint(state, path):
    """Write to a temporary file beside ``path``, flush it to disk, then rename it into place. A failed write
    (a full disk, an I/O error) is an OSError naming ``path``; the previous file stays, the temporary goes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    data = io.BytesIO()
    torch.save(state, data)  # in memory first: torch.save would turn a failed write into a RuntimeError
    try:
        with open(tmp, "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Load a checkpoint on the CPU without running pickled code; one clear InputError otherwise."""
    try:
        with warnings.catch_warnings():  # a plain pickle is refused below; torch's warning about its protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # would come before that line
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():  # torch refused a pickle that would construct other objects
            raise InputError(f"{path} contains objects other than tensors and plain data; refused "
                             "(loading it could run code)") from None
        raise InputError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint; "
                         "pass an intact one") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError) as err:  # IndexError: a
        # text file the unpickler reads as opcodes
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint "
                         f"({reason}); pass an intact one") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("net"), dict):
        raise InputError(f"{path} is not a checkpoint of this method (no 'net' state dict); pass a ckpt_embed.t7 "
                         "(stage 1), ckpt_ul.t7 (stage 2), ckpt_joint.t7 (joint.py) or ckpt_semi.t7 (semi.py)")
    return ckpt


def checkpoint_stage(ckpt):
    """1 for a stage-1 file (memory bank 'npc'), 2 for a stage-2 file (heads 'fc'), 3 for a few-label
    fine-tuning file of semi.py ('classifier')."""
    if "classifier" in ckpt:
        return 3
    if "fc" in ckpt:
        return 2
    if "npc" in ckpt:
        return 1
    raise InputError("the checkpoint has neither 'npc' (stage 1) nor 'fc' (stage 2): not a file of this method")


def checkpoint_kind(ckpt):
    """The file in words, for a message: "a stage-N checkpoint" (``checkpoint_stage``), or "a joint-model
    checkpoint (joint.py)" for one of joint.py, which holds heads as a stage-2 file does."""
    if ckpt.get("joint"):
        return "a joint-model checkpoint (joint.py)"
    return f"a stage-{checkpoint_stage(ckpt)} checkpoint"


def saved_arguments(ckpt):
    """The flags ``ckpt`` was trained with (its ``args``), {} where it records none (released files)."""
    saved = ckpt.get("args")
    return saved if isinstance(saved, dict) else {}


def normalization(dataset):
    """The per-channel mean and std the network's inputs were normalized with, saved in every checkpoint
    so that new images (another folder) are normalized as the training images were."""
    return {"mean": list(dataset.mean), "std": list(dataset.std)}


def strip_prefix(state_dict, prefix=PREFIX):
    return {(key[len(prefix):] if key.startswith(prefix) else key): value for key, value in state_dict.items()}


def load_network(net, state_dict, path):
    """Load ``net`` weights exactly: same keys, same shapes, with or without the 'module.' prefix.

    A mismatch names the first differing key, which tells a checkpoint of another ``--network``
    or ``--low_dim`` apart from a file of another kind.
    """
    state_dict = strip_prefix(state_dict)
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise InputError(f"{path} holds another network ({len(missing)} missing keys e.g. "
                         f"{(missing or ['-'])[0]!r}, {len(unexpected)} unexpected e.g. "
                         f"{(unexpected or ['-'])[0]!r}); check --network")
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            hint = (" (the embedding dimension: check --low_dim)" if key == "linear.bias"
                    else " (the network's width: check --width)" if key.startswith("conv1")
                    else " (check --low_dim and --width)" if key.startswith("linear") else "")
            raise InputError(f"{path}: {key} has shape {tuple(value.shape)}, this network expects "
                             f"{tuple(own[key].shape)}{hint}")
    net.load_state_dict(state_dict)
