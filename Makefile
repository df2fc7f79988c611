# Two environments: TransformerLens 4.x (TransformerBridge only) and 3.9 (also HookedTransformer).
PYTHON ?= python3
TL4 ?= 4.3.0
TL3 ?= 3.9.0
VENV ?= .venv-tl4
TL ?= $(TL4)
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup discover test test-env bench bench-peer clean

# One environment: torch's CPU build (pinned: an unpinned torch pulls a CUDA build), then the package.
$(VENV)/.ready-$(TL): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]" "transformer-lens==$(TL)"
	touch $@

setup: $(VENV)/.ready-$(TL)

# The main job: discover a circuit on a model the project ships.
discover: setup
	$(VENV)/bin/funcpatch discover

# The whole suite (notebooks included) in both TransformerLens environments.
test:
	$(MAKE) test-env VENV=.venv-tl4 TL=$(TL4)
	$(MAKE) test-env VENV=.venv-tl3 TL=$(TL3)

test-env: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

# auto-circuit 1.0.1 needs TransformerLens < 4 (and attrs, which its release does not
# declare; pyarrow then wants numpy >= 2): its own environment, for the benchmark's peer.
.venv-ac/.ready:
	$(PYTHON) -m venv .venv-ac
	.venv-ac/bin/pip install -q torch==2.13.0
	.venv-ac/bin/pip install -q auto-circuit==1.0.1 transformer-lens==2.16.1 attrs
	.venv-ac/bin/pip install -q "numpy>=2"
	touch $@

bench-peer: .venv-ac/.ready

bench: setup bench-peer
	AUTOCIRCUIT_PYTHON=.venv-ac/bin/python $(VENV)/bin/python benchmarks/run.py

clean:
	rm -rf .venv-tl4 .venv-tl3 .venv-ac out
