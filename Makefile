# make demo: stage 1 + stage 2 on scikit-learn's bundled digits (CPU, a few minutes, no download)
# make test: the whole test suite (CPU); make test-fast: the math and unit tests only (seconds)
# make test-kernels: the tests whose numbers depend on the CPU's kernels under PyTorch's generic ones (CI runs it)
# make lint: ruff with the rules in pyproject.toml
# make gpu-check: everything measured on a CUDA machine, into runs/gpu-check (under 10 minutes on one GPU)
# All create .venv and install requirements-dev.txt (requirements.txt + pytest, ruff) on first use.
# make test-lower: make test-fast in a second environment, .venv-lower, holding exactly the lower bounds (>=) of
#   requirements.txt and of requirements-dev.txt's pytest and pytest-xdist: about 3 GB downloaded (torch 2.1 from
#   PyPI is its CUDA build), 5 GB on disk; measured 9 min 40 s on 2 busy cores (5.5 minutes to install, 4 of tests).
#   Pillow 9.0 has no Python 3.11 wheel: pip builds it (once; it needs the zlib and libjpeg headers).
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO ?= runs/demo
DEMO_FLAGS := --dataset digits --width 16 --batch_size 32 --workers 2
# batch 32 instead of 128: the released learning rates scaled by 32/128 (0.03 -> 0.0075, 0.01 -> 0.0025)

FASHION ?= runs/fashion
FASHION_FLAGS := --dataset fashion-mnist --subset 3000 --width 16 --batch_size 32 --workers 2

GPU_CHECK ?= runs/gpu-check

.PHONY: demo test test-fast test-kernels test-lower lint bench fashion own-images semi-demo gpu-check

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PYTHON) super_and.py $(DEMO_FLAGS) --lr 0.0075 --rounds 2 --epochs 5 --model_dir $(DEMO)/stage1
	$(PYTHON) main.py $(DEMO_FLAGS) --lr 0.0025 --epochs 5 --resume $(DEMO)/stage1/ckpt_embed.t7 --model_dir $(DEMO)/stage2
	$(PYTHON) main.py $(DEMO_FLAGS) --test_only --resume $(DEMO)/stage2/ckpt_ul.t7 --model_dir $(DEMO)/stage2 --kmeans_baseline
	@echo "pictures: $(DEMO)/stage2/*.png (curves, confusion matrix, clusters, mutual information, per-class accuracy)"

# the tests run their tiny networks on one thread each (PyTorch, and the OpenMP/BLAS threads of numpy,
# scipy and scikit-learn): two test processes use both cores without threads spinning against each other
TEST_WORKERS ?= 2
# worksteal: a test process that runs out of tests takes half of what the other still has queued (pytest-xdist >= 3.2)
XDIST := -n $(TEST_WORKERS) --dist worksteal
# PYTHONDONTWRITEBYTECODE emptied: bytecode caches are written even where the environment turns them off, since
# pytest keeps its rewritten test modules there (without them each test process spends about 4 s rewriting
# assertions; __pycache__ is ignored by git)
TEST_ENV := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=
test: $(VENV)/.installed
	$(TEST_ENV) $(PYTHON) -m pytest -q $(XDIST)

FAST := -m pytest -q $(XDIST) -m "not slow"
test-fast: $(VENV)/.installed
	$(TEST_ENV) $(PYTHON) $(FAST)

# every "name>=version" of the two files as "name==version" (ruff aside: it only lints)
LOWER_VENV ?= .venv-lower
$(LOWER_VENV)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(LOWER_VENV)
	sed -n 's/^\([A-Za-z0-9_.-]*\)>=\([0-9.]*\).*/\1==\2/p' requirements.txt requirements-dev.txt \
		| grep -v '^ruff==' > $(LOWER_VENV)/lower-bounds.txt
	$(LOWER_VENV)/bin/python -m pip install -q -r $(LOWER_VENV)/lower-bounds.txt
	touch $@

test-lower: $(LOWER_VENV)/.installed
	$(TEST_ENV) $(LOWER_VENV)/bin/python $(FAST)

# The tests whose numbers depend on the CPU's kernels (golden, wiring, resume) with PyTorch's generic kernels
# (ATEN_CPU_CAPABILITY=default: what a CPU without AVX runs) and the golden tests on their tolerant path
# (GOLDEN_TOLERANT=1, tests/fixtures/README.md), as on a machine with no recording of its own
KERNEL_TESTS := tests/test_golden.py tests/test_golden_semi.py tests/test_wiring.py tests/test_resume.py
test-kernels: $(VENV)/.installed
	ATEN_CPU_CAPABILITY=default GOLDEN_TOLERANT=1 $(TEST_ENV) $(PYTHON) -m pytest -q $(XDIST) $(KERNEL_TESTS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PYTHON) bench/throughput.py --json bench/results-cpu.json

# On a CUDA machine: the cuda tests, throughput (fp32, --amp, --amp --gpu_augment), a two-GPU torchrun run
# where there are two, a short Fashion-MNIST run of both stages; all into $(GPU_CHECK) (bench/gpu_check.py)
gpu-check: $(VENV)/.installed
	$(PYTHON) bench/gpu_check.py --out $(GPU_CHECK)

# The Fashion-MNIST run in README (about 20 minutes on 2 CPU cores); its pictures are copied to fig/
fashion: $(VENV)/.installed
	rm -rf $(FASHION)
	$(PYTHON) super_and.py $(FASHION_FLAGS) --rounds 2 --epochs 4 --model_dir $(FASHION)/stage1
	$(PYTHON) main.py $(FASHION_FLAGS) --epochs 4 --resume $(FASHION)/stage1/ckpt_embed.t7 --model_dir $(FASHION)/stage2
	$(PYTHON) main.py $(FASHION_FLAGS) --test_only --resume $(FASHION)/stage2/ckpt_ul.t7 --model_dir $(FASHION)/stage2 --kmeans_baseline
	cp $(FASHION)/stage2/curves.png fig/fashion_mnist_curves.png
	cp $(FASHION)/stage2/confusion_matrix.png fig/fashion_mnist_confusion.png

# Your own images, shown on 3,000 Fashion-MNIST test images written out as PNG files in class sub-folders
# (about 15 minutes on 2 CPU cores); its cluster picture is copied to fig/
OWN ?= runs/own
OWN_FLAGS := --dataset folder --data_dir $(OWN)/images --width 16 --batch_size 32 --workers 2
own-images: $(VENV)/.installed
	rm -rf $(OWN)
	$(PYTHON) tools/export_image_folder.py --dataset fashion-mnist --split test --count 3000 --out $(OWN)/images
	$(PYTHON) super_and.py $(OWN_FLAGS) --rounds 2 --epochs 3 --model_dir $(OWN)/run
	$(PYTHON) main.py $(OWN_FLAGS) --epochs 3 --resume ckpt_embed.t7 --model_dir $(OWN)/run
	$(PYTHON) main.py $(OWN_FLAGS) --test_only --resume ckpt_ul.t7 --model_dir $(OWN)/run --export_predictions $(OWN)/predictions.csv
	cp $(OWN)/run/clusters.png fig/own_images_clusters.png

# Few labels (10 per class) on digits from scratch, from stage 1 and from stage 2 of `make demo` (run it first)
SEMI ?= runs/semi
SEMI_FLAGS := --dataset digits --width 16 --workers 2 --batch_size 32 --labels_per_class 10
semi-demo: $(VENV)/.installed
	rm -rf $(SEMI)
	$(PYTHON) semi.py $(SEMI_FLAGS) --from_scratch --model_dir $(SEMI)/scratch
	$(PYTHON) semi.py $(SEMI_FLAGS) --resume $(DEMO)/stage1/ckpt_embed.t7 --model_dir $(SEMI)/stage1
	$(PYTHON) semi.py $(SEMI_FLAGS) --resume $(DEMO)/stage2/ckpt_ul.t7 --model_dir $(SEMI)/stage2
	@for r in scratch stage1 stage2; do printf "%-8s " $$r; cat $(SEMI)/$$r/eval_semi.json | tr -d '\n'; echo; done

# The paper's experiments section (Tables 2, 3, supplementary C, D) with the real scripts, into $(PAPER)/tables.md
# and tables.json; run it again to continue (finished runs are skipped, a killed one resumed).
# PAPER_FLAGS="--scale paper --dataset cifar10" for the paper's epochs and network (the estimated cost is printed first; add --dry_run to see only that).
PAPER ?= runs/paper
PAPER_FLAGS ?= --scale cpu --dataset fashion-mnist
.PHONY: paper
paper: $(VENV)/.installed
	$(PYTHON) experiments/paper.py --tables 2 3 C D $(PAPER_FLAGS) --out $(PAPER)

# The paper's claims decided at the 'fair' CPU scale: Tables 2, 3, 4, supplementary C and D, three seeds each, every
# stage levelled off (docs/results.md); hours on 2 CPU cores, two runs side by side on one thread each; resumable:
# run it again to continue
PAPER_FAIR ?= runs/paper-fair
PAPER_JOBS ?= 2
.PHONY: paper-fair
paper-fair: $(VENV)/.installed
	$(PYTHON) experiments/paper.py --tables 2 3 C D 4 --scale fair --dataset fashion-mnist --seeds 3 --jobs $(PAPER_JOBS) \
		--out $(PAPER_FAIR)
