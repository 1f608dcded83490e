# Two entry points, each doing all the set-up it needs on a fresh machine (Debian, Python 3.11).
PY ?= python3
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup demo test

setup:
	@test -f $(DATA_DIR)/t10k-images-idx3-ubyte.gz || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)
	$(PY) -m pip install -q -e '.[train,export,serve,bench,dev]'

demo: setup
	$(PY) -m purifier.cli demo --model models/fashion-mnist --n 1000 --eps 0.1 --steps 40 --out demo-out

test: setup
	$(PY) -m pytest -q tests

# Retrain the shipped default from scratch (about 20 minutes on 2 cores), export it, regenerate its card.
MODEL_DIR ?= models/fashion-mnist
CLF_EPOCHS ?= 12
CVAE_EPOCHS ?= 5
.PHONY: default-model
default-model: setup
	purifier train-classifier --data fashion-mnist --arch a --epochs $(CLF_EPOCHS) --seed 0 --out $(MODEL_DIR)/classifier
	purifier train --data fashion-mnist --source $(MODEL_DIR)/classifier --out $(MODEL_DIR) --epochs $(CVAE_EPOCHS) \
		--seed 0 --sel-weight 100
	purifier evaluate --model $(MODEL_DIR) --out results/eval-fashion-mnist.json
	purifier export $(MODEL_DIR) --out $(MODEL_DIR)
	$(PY) benchmarks/model_card.py $(MODEL_DIR) results/eval-fashion-mnist.json > $(MODEL_DIR)/MODEL_CARD.md.tmp
	mv $(MODEL_DIR)/MODEL_CARD.md.tmp $(MODEL_DIR)/MODEL_CARD.md

# The benchmark's baselines (about 30 minutes on 2 cores): PGD-AT (Madry; eps 0.1, PGD-5, 3 epochs),
# the FGSM adversarial loss (alpha 0.5, eps 0.1, 3 epochs) and the Defense-GAN-style baseline's VAE.
BASELINES ?= models/baselines
.PHONY: baselines robust robust-quick
baselines: setup
	$(PY) -m purifier.cli train-classifier --data fashion-mnist --arch a --epochs 3 --seed 0 --adversarial pgd \
		--adv-eps 0.1 --adv-steps 5 --out $(BASELINES)/pgd-at
	$(PY) -m purifier.cli train-classifier --data fashion-mnist --arch a --epochs 3 --seed 0 --adversarial fgsm \
		--adv-eps 0.1 --adv-mix 0.5 --out $(BASELINES)/fgsm-at
	$(PY) -m purifier.cli train-vae --data fashion-mnist --epochs 10 --seed 0 --out $(BASELINES)/defensegan-vae
	$(PY) benchmarks/baselines_card.py $(BASELINES) > $(BASELINES)/MODEL_CARD.md.tmp
	mv $(BASELINES)/MODEL_CARD.md.tmp $(BASELINES)/MODEL_CARD.md

# Robust accuracy under every threat model, beside the baselines: results/robust-full.{json,md} and plots.
robust: setup
	$(PY) benchmarks/robust.py --profile full

robust-quick: setup
	$(PY) benchmarks/robust.py --profile quick
