"""The method of both stages, its evaluation and its checkpoint format.

Stage 1 (Super-AND): ``memory_bank`` (the bank of past embeddings and its logits),
``neighbourhoods`` (anchor-neighbourhood discovery), ``losses`` (AND, UE and AUG: Eq. 1-3).
Stage 2 (class assignment): ``losses`` (Eq. 9 and Eq. 11). Both stages: ``optim`` (SGD with
Nesterov momentum), ``schedules`` (learning rate, UE weight, anchors per round), ``protocols``
(weighted kNN; Hungarian accuracy, NMI, ARI) and ``checkpoint``. The method's functions take
plain, named hyperparameters and follow the device and the floating-point dtype of their inputs.
"""
