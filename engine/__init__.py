"""What every training script does around its method: command line, device and RNG, the run folder's life."""
