"""The opening every training script shares, before its method begins."""
from . import distributed
from .cli import check_output_dir
from .system import keep_freed_memory, seed_everything


def open_script(args, writes=True):
    """The device, chosen once (joining the process group under torchrun); on the CPU, glibc keeps freed
    memory (``keep_freed_memory``); ``--model_dir`` checked writable before any work when the run
    ``writes`` there; every random stream seeded by ``--seed``. Returns the device."""
    device = distributed.init(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    if writes:
        check_output_dir(args.model_dir)
    seed_everything(args.seed)
    return device
