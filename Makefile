# Two entry points, each doing all the set-up it needs on a fresh machine (Debian, Python 3.11).
PY ?= python3
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup demo test

# nvidia-pytriton brings the tritonserver binary (Python backend, CPU) that `purifier serve --engine triton` and
# tests/test_tritonserver.py run. --no-deps: the wheel declares numpy<2, and only its binary is used (pytriton's own
# Python API answers with empty tensors under numpy 2), so nothing else of it is needed.
setup:
	@test -f $(DATA_DIR)/t10k-images-idx3-ubyte.gz || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)
	@echo "pip: installing purifier and its extras (train, export, serve, bench, dev, cluster) with the pins in" \
		"constraints.txt; torch and CUDA wheels are large, this can take several minutes"
	$(PY) -m pip install -c constraints.txt -e '.[train,export,serve,bench,dev,cluster]'
	$(PY) -m pip install --no-deps -c constraints.txt nvidia-pytriton

demo: setup
	$(PY) -m purifier.cli demo --model fashion-mnist --n 1000 --eps 0.1 --steps 40 --out demo-out

test: setup
	$(PY) -m pytest -q tests

# Plain PuVAE from scratch (about 20 minutes on 2 cores): classifier, CVAE, evaluation, export, card.
PLAIN ?= models/fashion-mnist-plain
# a model directory's card, written atomically: $(call card,MAKE TARGET,DIR,EVALUATION REPORT). It quotes every
# benchmark row measured on the directory's weights from whichever results files exist.
BENCH_RESULTS = $(wildcard results/adversarial.json results/adversarial-full.json results/variants.json \
	results/variants-full.json results/byo.json results/byo-standard.json)
card = $(PY) -m benchmarks.model_card --made-by '$(1)' $(2) $(3) $(BENCH_RESULTS) > $(2)/MODEL_CARD.md.tmp && \
	mv $(2)/MODEL_CARD.md.tmp $(2)/MODEL_CARD.md
CLF_EPOCHS ?= 12
CVAE_EPOCHS ?= 5
.PHONY: plain-model default-model
plain-model: setup
	$(PY) -m purifier.cli train-classifier --data fashion-mnist --arch a --epochs $(CLF_EPOCHS) --seed 0 \
		--out $(PLAIN)/classifier
	$(PY) -m purifier.cli train --data fashion-mnist --source $(PLAIN)/classifier --out $(PLAIN) \
		--epochs $(CVAE_EPOCHS) --seed 0 --sel-weight 100
	$(PY) -m purifier.cli evaluate --model $(PLAIN) --out results/eval-fashion-mnist-plain.json
	$(MAKE) clean-table
	$(PY) -m purifier.cli export $(PLAIN) --out $(PLAIN)
	$(call card,make plain-model,$(PLAIN),results/eval-fashion-mnist-plain.json)

# Every results table quoted in README.md and docs/, refreshed from its results file (after any benchmark).
.PHONY: docs-tables
docs-tables:
	$(PY) -m benchmarks.docs_tables

# The clean-accuracy table of the shipped models (docs/robustness.md), from their evaluations: the default, plain
# PuVAE in front of the same classifier, and the joint model.
.PHONY: clean-table
clean-table:
	$(PY) -m benchmarks.clean_table --out results/clean-accuracy.json results/eval-middleware-$(notdir $(MODEL_DIR)).json \
		results/eval-fashion-mnist-plain.json results/adversarial/eval-joint.json
	$(PY) -m benchmarks.docs_tables

# The shipped default: the best purifier in front of the untouched standard classifier it ships, with clean accuracy
# >= 85% (results/byo.md): the CVAE alone adversarially trained against attacks through the plain model's frozen
# classifier A, 2 epochs (PGD-3 selection and full gradient; $(MIDDLEWARE)), then 2 more with PGD-7, the targeted
# selection attack and TRADES's smoothness term on the selection softmax at weight 200 ($(MIDDLEWARE)-smooth200),
# then 1 more at selection temperature 0.003 ($(MIDDLEWARE)-smooth200-tau3; `make plain-model` first), then 1 more
# with the converged PGD-AT of A in its rule as a robust prior at mu 0.001 ($(MIDDLEWARE)-smooth200-tau3-prior1;
# `make converged-baselines` first), then the same prior attached at mu 0.002
# ($(MIDDLEWARE)-smooth200-tau3-prior1-mu2), then its exports, int8 twin and card.
MODEL_DIR ?= $(MIDDLEWARE)-smooth200-tau3-prior1-mu2
default-model: middleware middleware-smooth200 middleware-tau middleware-prior middleware-prior-mu2
	$(MAKE) clean-table
	$(PY) -m purifier.cli export $(MODEL_DIR) --out $(MODEL_DIR) --int8
	$(call card,make default-model,$(MODEL_DIR),results/eval-middleware-$(notdir $(MODEL_DIR)).json)

# The int8 twin of the shipped default against fp32 (results/int8.md; about 35 minutes on 2 cores, most of it the
# attacks) and what limits the speed (results/speed.md, results/ort-tuning.md).
.PHONY: int8-bench
int8-bench: setup
	$(PY) -m benchmarks.int8 --model $(MODEL_DIR) --out results/int8.json
	$(PY) -m benchmarks.speed --model $(MODEL_DIR) --out results/speed.json
	$(PY) -m benchmarks.ort_tuning --model $(MODEL_DIR) --out results/ort-tuning.json
	$(PY) -m benchmarks.docs_tables

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
	$(PY) -m benchmarks.baselines_card $(BASELINES) > $(BASELINES)/MODEL_CARD.md.tmp
	mv $(BASELINES)/MODEL_CARD.md.tmp $(BASELINES)/MODEL_CARD.md

# Baselines trained to convergence on classifier A: PGD-AT (Madry; PGD-10 training at eps 0.1) and TRADES (beta 6,
# 10 KL steps), up to $(CONVERGED_EPOCHS) epochs on a cosine schedule; after each epoch PGD-20 on 1,000 held-out images
# gives the validation robust accuracy, the best epoch's weights are kept and 4 epochs without a better one end the
# run. About 12 minutes per epoch each on 2 cores. Resumable: rerun the target after an interruption to continue.
CONVERGED_EPOCHS ?= 15
.PHONY: converged-baselines
converged-baselines: setup
	test -f $(BASELINES)/pgd-at-converged.json || $(PY) -m purifier.cli train-classifier --data fashion-mnist --arch a \
		--epochs $(CONVERGED_EPOCHS) --seed 0 --adversarial pgd --adv-eps 0.1 --adv-steps 10 --patience 4 \
		--save-every 50 --resume --out $(BASELINES)/pgd-at-converged
	test -f $(BASELINES)/trades-converged.json || $(PY) -m purifier.cli train-classifier --data fashion-mnist --arch a \
		--epochs $(CONVERGED_EPOCHS) --seed 0 --adversarial trades --adv-beta 6 --adv-eps 0.1 --adv-steps 10 \
		--patience 4 --save-every 50 --resume --out $(BASELINES)/trades-converged

# Robust accuracy under every threat model, beside the baselines: results/robust-full.{json,md} and plots.
robust: setup
	$(PY) -m benchmarks.robust --profile full

robust-quick: setup
	$(PY) -m benchmarks.robust --profile quick

# Adversarial training through the whole pipeline (about 1.5 hours on 2 cores): each mode from the plain PuVAE
# model, PGD-AT as CE source and target, selection + full-gradient PGD-3 examples at eps 0.1; joint and
# classifier-alone for 1.5 epochs, CVAE-alone and alternating for 0.75.
# The joint run is also served by name (fashion-mnist-joint): its ONNX files and int8 twins are exported.
# Then the benchmark that compares them (results/adversarial.{json,md,png}).
ADV ?= models/adversarial
.PHONY: adversarial adversarial-bench
adversarial: setup
	$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(PLAIN) --adversarial joint --epochs 1.5 \
		--out $(ADV)/joint
	$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(PLAIN) --adversarial classifier --epochs 1.5 \
		--out $(ADV)/classifier
	$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(PLAIN) --adversarial cvae --epochs 0.75 \
		--out $(ADV)/cvae
	$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(PLAIN) --adversarial alternating --epochs 0.75 \
		--out $(ADV)/alternating
	$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(ADV)/alternating \
		--target $(ADV)/alternating/classifier --adversarial alternating --epochs 0.75 --out $(ADV)/alternating-longer
	$(PY) -m purifier.cli export $(ADV)/joint --out $(ADV)/joint --int8
	$(MAKE) adversarial-cards

# The longer alternating run continued 2 epochs against stronger attacks (PGD-7; selection, targeted selection
# toward the runner-up class, full gradient and BPDA, each on its slice of the batch): where the alternating mode
# saturates. --resume: rerunning the target after an interruption continues from the saved state.
.PHONY: alternating-pgd7
alternating-pgd7: setup
	$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(ADV)/alternating-longer \
		--target $(ADV)/alternating-longer/classifier --adversarial alternating --epochs 2 --adv-steps 7 \
		--adv-attacks selection,targeted,full,bpda --seed 0 --resume --out $(ADV)/alternating-pgd7
	$(PY) -m purifier.cli evaluate --model $(ADV)/alternating-pgd7 --out results/adversarial/eval-alternating-pgd7.json
	$(call card,make alternating-pgd7,$(ADV)/alternating-pgd7,results/adversarial/eval-alternating-pgd7.json)

# each mode's evaluation report and card (quoting the benchmark rows on its weights, once run)
ADV_MODES ?= joint classifier cvae alternating alternating-longer
.PHONY: adversarial-cards
adversarial-cards:
	mkdir -p results/adversarial
	for m in $(ADV_MODES); do \
		$(PY) -m purifier.cli evaluate --model $(ADV)/$$m --out results/adversarial/eval-$$m.json && \
		$(call card,make adversarial,$(ADV)/$$m,results/adversarial/eval-$$m.json) || exit 1; \
	done

adversarial-bench: setup converged-baselines
	$(PY) -m benchmarks.adversarial --profile standard --plain $(PLAIN)

# The purifier family (README "choosing a purifier"): every design that trains differently from PuVAE, with
# PuVAE's settings (standard classifier as source and target, 5 epochs, seed 0), into $(VARIANTS)/DESIGN (the CVAE
# and its card; the target is $(PLAIN)'s classifier); the likelihood, IWAE and analysis-by-synthesis designs only
# change inference and run on $(PLAIN)'s weights.
VARIANTS ?= models/variants
TRAINED_DESIGNS ?= ks-cov ks-cov-coupled beta-tc seatbelt hcvae
.PHONY: variants
variants: setup
	for d in $(TRAINED_DESIGNS); do \
		$(PY) -m purifier.cli train --arch $$d --data fashion-mnist --source $(PLAIN)/classifier \
			--out $(VARIANTS)/$$d --epochs $(CVAE_EPOCHS) --seed 0 --quiet || exit 1; \
	done
	$(MAKE) variant-cards

# each trained design again with the adversarial-training mode, as $(ADV)/alternating was made from PuVAE (PGD-AT
# as CE source and target, alternating, 0.75 epoch), into $(VARIANTS)/DESIGN/adversarial (CVAE and target classifier)
.PHONY: variants-adversarial
variants-adversarial: setup
	for d in $(TRAINED_DESIGNS); do \
		$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(VARIANTS)/$$d --adversarial alternating \
			--epochs 0.75 --out $(VARIANTS)/$$d/adversarial --quiet || exit 1; \
	done
	$(MAKE) variant-adversarial-cards

# ks-cov-coupled + adversarial training continued as alternating-pgd7 continues the PuVAE run: 2 epochs against PGD-7
# selection, targeted selection, full gradient and BPDA (resumable: the same command continues an interrupted run)
.PHONY: ks-cov-coupled-pgd7
ks-cov-coupled-pgd7: setup
	$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(VARIANTS)/ks-cov-coupled/adversarial \
		--target $(VARIANTS)/ks-cov-coupled/adversarial/classifier --adversarial alternating --epochs 2 --adv-steps 7 \
		--adv-attacks selection,targeted,full,bpda --seed 0 --resume --out $(VARIANTS)/ks-cov-coupled/adversarial-pgd7
	mkdir -p results/variants
	$(PY) -m purifier.cli evaluate --model $(VARIANTS)/ks-cov-coupled/adversarial-pgd7 --selection mse \
		--selection likelihood --out results/variants/eval-ks-cov-coupled-adversarial-pgd7.json
	$(call card,make ks-cov-coupled-pgd7,$(VARIANTS)/ks-cov-coupled/adversarial-pgd7,results/variants/eval-ks-cov-coupled-adversarial-pgd7.json)

# ks-cov-coupled-pgd7 (still rising at 2 epochs) continued 2 more epochs against the same attacks with TRADES's
# smoothness term on the selection softmax at weight 200 (as make middleware-smooth200); resumable
.PHONY: ks-cov-coupled-smooth
ks-cov-coupled-smooth: setup
	$(PY) -m purifier.cli train --source $(BASELINES)/pgd-at --init $(VARIANTS)/ks-cov-coupled/adversarial-pgd7 \
		--target $(VARIANTS)/ks-cov-coupled/adversarial-pgd7/classifier --adversarial alternating --epochs 2 \
		--adv-steps 7 --adv-attacks selection,targeted,full,bpda --adv-smooth-weight 200 --seed 0 --resume \
		--out $(VARIANTS)/ks-cov-coupled/adversarial-smooth
	mkdir -p results/variants
	$(PY) -m purifier.cli evaluate --model $(VARIANTS)/ks-cov-coupled/adversarial-smooth --selection mse \
		--selection likelihood --out results/variants/eval-ks-cov-coupled-adversarial-smooth.json
	$(call card,make ks-cov-coupled-smooth,$(VARIANTS)/ks-cov-coupled/adversarial-smooth,results/variants/eval-ks-cov-coupled-adversarial-smooth.json)

# their evaluation reports and cards (the card quotes results/variants.json's row on the same weights, once run)
.PHONY: variant-adversarial-cards
variant-adversarial-cards:
	mkdir -p results/variants
	for d in $(TRAINED_DESIGNS); do \
		$(PY) -m purifier.cli evaluate --model $(VARIANTS)/$$d/adversarial --selection mse --selection likelihood \
			--out results/variants/eval-$$d-adversarial.json && \
		$(call card,make variants-adversarial,$(VARIANTS)/$$d/adversarial,results/variants/eval-$$d-adversarial.json) \
			|| exit 1; \
	done

# evaluation report and model card of every trained design (quoting results/variants.json's rows on its weights)
.PHONY: variant-cards
variant-cards:
	mkdir -p results/variants
	for d in $(TRAINED_DESIGNS); do \
		$(PY) -m purifier.cli evaluate --cvae $(VARIANTS)/$$d/cvae --classifier $(PLAIN)/classifier \
			--selection mse --selection likelihood --out results/variants/eval-$$d.json && \
		$(call card,make variants,$(VARIANTS)/$$d,results/variants/eval-$$d.json) || exit 1; \
	done


# Bring your own classifier (results/byo.*): purifiers in front of frozen classifiers the CVAE never changes.
# The plain model's standard classifier A: its CVAE trained alone against attacks through it ($(MIDDLEWARE)).
# A small ResNet the project did not make (benchmarks/byo_models.py), trained plainly, then brought in the two
# ways a user brings one: its factory + safetensors, and its model.onnx; for each, plain PuVAE (the plain model's
# settings) and the CVAE alone adversarially trained in front of it.
BYO ?= models/byo
MIDDLEWARE ?= models/middleware/cvae-alone
MW_EPOCHS ?= 2
RESNET = --classifier-factory benchmarks/byo_models.py:small_resnet \
	--classifier-weights $(BYO)/resnet/classifier.safetensors
RESNET_ONNX = --classifier-onnx $(BYO)/resnet/model.onnx
.PHONY: middleware middleware-pgd7 middleware-targeted middleware-smooth byo-models byo
middleware: setup
	$(PY) -m purifier.cli train --source $(PLAIN)/classifier --init $(PLAIN) --target $(PLAIN)/classifier \
		--adversarial cvae --epochs $(MW_EPOCHS) --seed 0 --out $(MIDDLEWARE)
	$(PY) -m purifier.cli evaluate --model $(MIDDLEWARE) --out results/eval-middleware-cvae-alone.json
	$(PY) -m purifier.cli export $(MIDDLEWARE)
	$(call card,make middleware,$(MIDDLEWARE),results/eval-middleware-cvae-alone.json)

# The middleware CVAE trained 2 more epochs against stronger attacks (PGD-7; selection, full gradient and BPDA,
# each on its slice of the batch): where the CVAE-alone setting saturates.
middleware-pgd7: setup
	$(PY) -m purifier.cli train --source $(PLAIN)/classifier --target $(PLAIN)/classifier --init $(MIDDLEWARE) \
		--adversarial cvae --epochs 2 --adv-steps 7 --adv-attacks selection,full,bpda --seed 0 --out $(MIDDLEWARE)-pgd7
	$(PY) -m purifier.cli evaluate --model $(MIDDLEWARE)-pgd7 --out results/eval-middleware-cvae-alone-pgd7.json
	$(call card,make middleware-pgd7,$(MIDDLEWARE)-pgd7,results/eval-middleware-cvae-alone-pgd7.json)

# The same 2 epochs with a fourth slice of the batch under the targeted selection attack (toward the runner-up
# class), the attack that breaks the most images the untargeted ones leave standing.
middleware-targeted: setup
	$(PY) -m purifier.cli train --source $(PLAIN)/classifier --target $(PLAIN)/classifier --init $(MIDDLEWARE) \
		--adversarial cvae --epochs 2 --adv-steps 7 --adv-attacks selection,targeted,full,bpda --seed 0 \
		--out $(MIDDLEWARE)-targeted
	$(PY) -m purifier.cli evaluate --model $(MIDDLEWARE)-targeted --out results/eval-middleware-cvae-alone-targeted.json
	$(call card,make middleware-targeted,$(MIDDLEWARE)-targeted,results/eval-middleware-cvae-alone-targeted.json)

# The same 2 epochs from the same start with TRADES's smoothness term on the decision rule (KL from the selection
# softmax on the clean batch to the one on the attacked batch): an idea aimed at the selection attack, against
# middleware-targeted. Weight 600 (TRADES's beta 6 times the selection CE weight 100) and 200 (beta 2).
# $(call smooth,MAKE TARGET,OUT DIR,WEIGHT)
smooth = $(call mw_train,$(MIDDLEWARE),$(2),2,$(3)) && $(call mw_eval,$(1),$(2))
# The CVAE alone trained from INIT against attacks through the frozen A (PGD-7 selection, targeted selection, full
# gradient and BPDA, each on its slice of the batch; smoothness weight W), resumable:
# $(call mw_train,INIT DIR,OUT DIR,EPOCHS,W[,MORE FLAGS]); and a run's evaluation report and card:
# $(call mw_eval,MAKE TARGET,DIR)
mw_train = $(PY) -m purifier.cli train --source $(PLAIN)/classifier --target $(PLAIN)/classifier --init $(1) \
		--adversarial cvae --epochs $(3) --adv-steps 7 --adv-attacks selection,targeted,full,bpda \
		--adv-smooth-weight $(4) --seed 0 --resume --out $(2) $(5)
mw_eval = $(PY) -m purifier.cli evaluate --model $(2) --out results/eval-middleware-$(notdir $(2)).json && \
	$(call card,$(1),$(2),results/eval-middleware-$(notdir $(2)).json)
.PHONY: middleware-smooth middleware-smooth200
middleware-smooth: setup
	$(call smooth,make middleware-smooth,$(MIDDLEWARE)-smooth,600)
middleware-smooth200: setup
	$(call smooth,make middleware-smooth200,$(MIDDLEWARE)-smooth200,200)

# Capacity: a CVAE twice as wide (channels 32,64, latent 32, hidden 512; 3.3M parameters against the preset's 0.84M),
# plain PuVAE for 2 epochs, then 1 epoch of middleware-smooth200's recipe (PGD-7 selection, targeted, full gradient
# and BPDA, smoothness weight 200) with A frozen; and the preset's width through the same epoch from the plain model's
# CVAE, its control. Each resumable; then their evaluations and cards.
WIDE ?= models/middleware/wide
NARROW ?= models/middleware/narrow-smooth200
.PHONY: middleware-capacity
middleware-capacity: setup
	$(PY) -m purifier.cli train --data fashion-mnist --source $(PLAIN)/classifier --out $(WIDE)-puvae --epochs 2 \
		--seed 0 --sel-weight 100 --channels 32,64 --latent-dim 32 --hidden 512 --resume
	$(call mw_train,$(WIDE)-puvae,$(WIDE)-smooth200,1,200)
	$(call mw_train,$(PLAIN),$(NARROW),1,200)
	$(call mw_eval,make middleware-capacity,$(WIDE)-puvae)
	$(call mw_eval,make middleware-capacity,$(WIDE)-smooth200)
	$(call mw_eval,make middleware-capacity,$(NARROW))

# The wider CVAE 1 epoch more against the same attacks (a fresh cosine schedule): where it saturates; then 1 more
# at selection temperature 0.003, the step of the default's CVAE before the prior: whether width and temperature add up
.PHONY: middleware-wide-more middleware-wide-tau
middleware-wide-more: setup
	$(call mw_train,$(WIDE)-smooth200,$(WIDE)-smooth200-more,1,200)
	$(call mw_eval,make middleware-wide-more,$(WIDE)-smooth200-more)
middleware-wide-tau: setup
	$(call mw_train,$(WIDE)-smooth200-more,$(WIDE)-smooth200-tau3,1,200,--sel-tau 0.003)
	$(call mw_eval,make middleware-wide-tau,$(WIDE)-smooth200-tau3)

# $(1) with the converged PGD-AT of A attached as a robust prior at weight $(3), into $(2) (kept if there)
attach_prior = test -f $(2)/cvae.json || $(PY) -m purifier.cli attach-prior $(1) \
	--prior $(BASELINES)/pgd-at-converged --weight $(3) --out $(2)
# The temperature-0.003 model (the default before) with the converged PGD-AT of A attached as a robust prior at
# mu 0.001 (score_c = MSE_c - 0.001 * log p(c | x)); its CVAE and the classifier A unchanged, the rejection threshold
# recalibrated
WITH_PRIOR = $(MIDDLEWARE)-smooth200-tau3-with-prior
.PHONY: middleware-tau-prior
middleware-tau-prior: setup converged-baselines
	$(call attach_prior,$(MIDDLEWARE)-smooth200-tau3,$(WITH_PRIOR),0.001)
	$(call mw_eval,make middleware-tau-prior,$(WITH_PRIOR))

# The robust prior trained through (the default's CVAE): the temperature-0.003 model's recipe 1 epoch more from it
# with the converged PGD-AT of A in the purifier's rule at mu 0.001 (score_c = MSE_c - 0.001 * log p(c | x)): the
# training attacks, the selection CE and the smoothness KL see the rule with the prior, so the CVAE is trained for
# the images the prior does not hold
.PHONY: middleware-prior
middleware-prior: setup converged-baselines
	$(call mw_train,$(MIDDLEWARE)-smooth200-tau3,$(MIDDLEWARE)-smooth200-tau3-prior1,1,200,--sel-tau 0.003 \
		--adv-prior-weight 0.001 --prior $(BASELINES)/pgd-at-converged)
	$(PY) -m purifier.cli evaluate --model $(MIDDLEWARE)-smooth200-tau3-prior1 --selection design --selection mse \
		--out results/eval-middleware-cvae-alone-smooth200-tau3-prior1.json
	$(call card,make middleware-prior,$(MIDDLEWARE)-smooth200-tau3-prior1,results/eval-middleware-cvae-alone-smooth200-tau3-prior1.json)

# The model trained through the robust prior with the prior's weight raised from 0.001 to 0.002 in its rule (the
# largest weight of results/rule-probe-prior1.md that keeps clean accuracy at or above 85% on the test set: 85.19%)
.PHONY: middleware-prior-mu2
middleware-prior-mu2: middleware-prior
	$(call attach_prior,$(MIDDLEWARE)-smooth200-tau3-prior1,$(MIDDLEWARE)-smooth200-tau3-prior1-mu2,0.002)
	$(call mw_eval,make middleware-prior-mu2,$(MIDDLEWARE)-smooth200-tau3-prior1-mu2)

# The model trained through the robust prior 1 epoch more by the same recipe with the prior at the weight the
# default's rule uses (0.002), so the training attacks, the selection CE and the smoothness KL see that rule
.PHONY: middleware-prior2
middleware-prior2: middleware-prior
	$(call mw_train,$(MIDDLEWARE)-smooth200-tau3-prior1,$(MIDDLEWARE)-smooth200-tau3-prior2,1,200,--sel-tau 0.003 \
		--adv-prior-weight 0.002 --prior $(BASELINES)/pgd-at-converged)
	$(call mw_eval,make middleware-prior2,$(MIDDLEWARE)-smooth200-tau3-prior2)

# The weight-200 model's recipe 1 epoch more from it with one setting changed, against its saturated curve:
# the training attacks at eps 0.125 instead of 0.1 (the validation check stays at 0.1), or the selection
# temperature at 0.003 or 0.01 instead of 0.001 (at 0.003 the selection CE and the smoothness KL keep pushing the
# margin between the true class's reconstruction error and the others' three times further), or the decision
# terms (selection CE on clean and attacked inputs, smoothness KL) at three times their weights against
# reconstruction and KL; or, for
# half an epoch, every image under all four training attacks with its worst result kept (--adv-combine worst)
# instead of one attack per slice of the batch.
.PHONY: middleware-eps middleware-tau middleware-tau10 middleware-decision middleware-worst
middleware-eps: setup
	$(call mw_train,$(MIDDLEWARE)-smooth200,$(MIDDLEWARE)-smooth200-eps125,1,200,--adv-eps 0.125 --adv-val-eps 0.1)
	$(call mw_eval,make middleware-eps,$(MIDDLEWARE)-smooth200-eps125)
middleware-tau: setup
	$(call mw_train,$(MIDDLEWARE)-smooth200,$(MIDDLEWARE)-smooth200-tau3,1,200,--sel-tau 0.003)
	$(call mw_eval,make middleware-tau,$(MIDDLEWARE)-smooth200-tau3)
middleware-tau10: setup
	$(call mw_train,$(MIDDLEWARE)-smooth200,$(MIDDLEWARE)-smooth200-tau10,1,200,--sel-tau 0.01)
	$(call mw_eval,make middleware-tau10,$(MIDDLEWARE)-smooth200-tau10)
middleware-worst: setup
	$(call mw_train,$(MIDDLEWARE)-smooth200,$(MIDDLEWARE)-smooth200-worst,0.5,200,--adv-combine worst)
	$(call mw_eval,make middleware-worst,$(MIDDLEWARE)-smooth200-worst)
middleware-decision: setup
	$(call mw_train,$(MIDDLEWARE)-smooth200,$(MIDDLEWARE)-smooth200-decision3,1,600,--sel-weight 300 --adv-sel-weight 300)
	$(call mw_eval,make middleware-decision,$(MIDDLEWARE)-smooth200-decision3)

byo-models: setup
	$(PY) -m benchmarks.byo_models --out $(BYO)/resnet --epochs 8
	$(PY) -m purifier.cli train --data fashion-mnist $(RESNET) --out $(BYO)/resnet-puvae --epochs $(CVAE_EPOCHS) \
		--seed 0 --sel-weight 100
	$(PY) -m purifier.cli train --data fashion-mnist $(RESNET) --init $(BYO)/resnet-puvae --adversarial cvae \
		--epochs $(MW_EPOCHS) --seed 0 --out $(BYO)/resnet-cvae-alone
	$(PY) -m purifier.cli train --data fashion-mnist $(RESNET_ONNX) --out $(BYO)/resnet-onnx-puvae \
		--epochs $(CVAE_EPOCHS) --seed 0 --sel-weight 100
	$(PY) -m purifier.cli train --data fashion-mnist $(RESNET_ONNX) --init $(BYO)/resnet-onnx-puvae \
		--adversarial cvae --epochs $(MW_EPOCHS) --seed 0 --out $(BYO)/resnet-onnx-cvae-alone
	$(MAKE) byo-cards

# PGD adversarial training of the same ResNet, the alternative to a purifier for a user who can retrain (PGD-10,
# eps 0.1, best validation robust epoch kept, patience 4; 2,121 s on 2 idle Xeon threads: interrupted, the same
# command with RESUME=--resume continues it exactly)
.PHONY: byo-pgd-at
byo-pgd-at: setup
	$(PY) -m benchmarks.byo_models --out $(BYO)/resnet-pgd-at --adversarial pgd --epochs 15 --patience 4 $(RESUME)

# each purifier of the ResNet's: its evaluation report and card (quoting the byo rows on its weights, once run)
.PHONY: byo-cards
byo-cards:
	@mkdir -p results/byo
	for m in resnet-puvae resnet-cvae-alone resnet-onnx-puvae resnet-onnx-cvae-alone; do \
		$(PY) -m purifier.cli evaluate --model $(BYO)/$$m --out results/byo/eval-$$m.json && \
		$(call card,make byo-models,$(BYO)/$$m,results/byo/eval-$$m.json) || exit 1; \
	done

byo: setup converged-baselines
	$(PY) -m benchmarks.byo --profile full
