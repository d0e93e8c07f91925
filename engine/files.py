"""The files a run writes in its folder (``--model_dir``), each name written once: the scripts write them,
engine/cli.py keeps every output flag off them, experiments/paper.py reads them. Plain names, no import."""
LOCK, CACHE = "run.lock", "cache"  # one run per folder (engine/lifecycle.py); decoded images of a folder
EMBED_CKPT, EMBED_LOG = "ckpt_embed.t7", "log_embed.jsonl"  # super_and.py
BEST, LAST, ASSIGN_LOG = "ckpt_ul.t7", "ckpt_ul_last.t7", "log_ul.jsonl"  # main.py: lowest-loss epoch, last epoch
JOINT_CKPT, JOINT_LOG = "ckpt_joint.t7", "log_joint.jsonl"  # joint.py
# the report of main.py and joint.py (main.py, the last section)
EVAL, CURVES, CONFUSION, CLUSTERS = "eval.json", "curves.png", "confusion_matrix.png", "clusters.png"
MUTUAL_INFORMATION, PER_CLASS = "mutual_information.png", "per_class_accuracy.png"
SEMI_CKPT, SEMI_LOG, SEMI_EVAL = "ckpt_semi.t7", "log_semi.jsonl", "eval_semi.json"  # semi.py
SEMI_INDEXES = "labelled_indexes.json"

RUN_FILES = (LOCK, EMBED_CKPT, EMBED_LOG, BEST, LAST, ASSIGN_LOG, JOINT_CKPT, JOINT_LOG, EVAL, CURVES, CONFUSION,
             CLUSTERS, MUTUAL_INFORMATION, PER_CLASS, SEMI_CKPT, SEMI_LOG, SEMI_EVAL, SEMI_INDEXES)

# experiments/paper.py's own: the lock of its --out (one harness per folder), the command of each run folder
HARNESS_LOCK, COMMAND = "paper.lock", "command.json"
HARNESS_FILES = (HARNESS_LOCK, COMMAND)
