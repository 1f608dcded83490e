# Two entry points, each doing all the set-up it needs on a fresh machine (Debian, Python 3.11).
PY ?= python3
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup demo test

setup:
	@test -f $(DATA_DIR)/t10k-images-idx3-ubyte.gz || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)
	$(PY) -m pip install -q -e '.[train,dev]'

demo: setup
	$(PY) -m purifier.cli evaluate --model models/fashion-mnist

test: setup
	$(PY) -m pytest -q tests
