# Set-up is automatic: `make demo` and `make test` create .venv and install what they need.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.dymu-installed
# torch 2.13.0 is the CPU wheel available on this machine; the package itself only needs torch>=2.4.
TORCH_SPEC ?= torch==2.13.0

# Every install takes the versions pinned in constraints.txt (the newest tested transformers and its dependencies).
CONSTRAINTS := constraints.txt
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: demo test test-lowest test-transformers bench install clean toy-model toy-eval eval-setup eval-test toy-onevision toy-onevision-eval

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

# The offline demo on the shipped toy LLaVA: about 30 s on 2 CPU cores after the install (README, Install).
demo: $(STAMP)
	$(BIN)/dymu demo

SHOW_TRANSFORMERS := $(BIN)/python -c "import transformers; print('testing with transformers', transformers.__version__)"

# The whole suite: about 2-3 minutes on 2 idle CPU cores after the install (README, Install).
test: $(STAMP)
	@$(SHOW_TRANSFORMERS)
	$(BIN)/python -m pytest -q

# The suite on another transformers release in the same venv (pure Python: seconds to swap), then back to the
# pinned one:  make test-transformers V=5.20.0.  `make test-lowest` uses the lowest supported release.
test-transformers: $(STAMP)
	test -n "$(V)" || { echo "usage: make test-transformers V=5.x.y"; exit 2; }
	$(PIP) "transformers==$(V)"
	@$(SHOW_TRANSFORMERS)
	$(BIN)/python -m pytest -q; status=$$?; $(PIP) -c $(CONSTRAINTS) transformers; exit $$status

test-lowest: $(STAMP)
	$(MAKE) test-transformers V=$$($(BIN)/python -c "from dymu.compat import TESTED_MIN; print(TESTED_MIN)")

# Retrain the shipped toy LLaVA (about an hour on 2 cores), evaluate it (about 10 min) and rewrite its model card.
# A killed run continues when re-run (--resume: from $(TOY_MODEL)/training_state.pt, written every 5 minutes, with the
# same result as an uninterrupted run); delete that file to start over.
TOY_MODEL ?= assets/toy-llava
toy-model: $(STAMP)
	$(BIN)/python -m toyvlm.train --out $(TOY_MODEL) --resume
	rm -rf $(TOY_MODEL)/thresholds $(TOY_MODEL)/eval
	$(MAKE) toy-eval

# Accuracy and CIDEr-D vs visual tokens of the toy model (unmerged, blind, prior; DToMe low/mid/high with and without
# VTU), accuracy vs FLOPs against the baselines (FastV, VTW, ToMe fixed r; toyvlm.baselines), the attention drift
# while it describes (toyvlm.diagnose --drift), then the model card.
toy-eval: $(STAMP)
	$(BIN)/python -m toyvlm.evaluate --model $(TOY_MODEL)
	$(BIN)/python -m toyvlm.baselines --model $(TOY_MODEL)
	$(BIN)/python -m toyvlm.diagnose --model $(TOY_MODEL) --drift
	$(BIN)/python -m toyvlm.card $(TOY_MODEL)

# Train the toy OneVision (toyvlm.train --arch onevision, its language model started from the toy LLaVA's), evaluate
# it and write its card. Resumes like toy-model; OMP_WAIT_POLICY=PASSIVE: on a shared machine spinning OpenMP threads
# made a training step ~10x slower (README, The toy model).
TOY_ONEVISION ?= assets/toy-llava-onevision
toy-onevision: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m toyvlm.train --arch onevision --out $(TOY_ONEVISION) --resume
	rm -rf $(TOY_ONEVISION)/thresholds $(TOY_ONEVISION)/eval
	$(MAKE) toy-onevision-eval

# The toy OneVision's test table (unmerged, blind, prior; DToMe ov-low/mid/high with VTU and compact; the reference's
# layout) and its model card; a killed evaluation keeps its finished rows.
toy-onevision-eval: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m toyvlm.evaluate_onevision --model $(TOY_ONEVISION)
	$(BIN)/python -m toyvlm.card $(TOY_ONEVISION)

# The eval extra (dymu eval, the lmms-eval plugin) in its own venv, so that `make test` keeps the small one: lmms-eval
# 0.7.3 pulls ~150 packages. Installed with torch pinned to the CPU wheel and the versions of constraints-eval.txt;
# then torchvision and timm go (the registry's torchvision is built for a CUDA torch and fails to import on the CPU
# one; timm imports it; neither is used) and a check fails loudly if any of that did not hold. About 2 minutes.
EVAL_VENV ?= .venv-eval
EVAL_BIN := $(EVAL_VENV)/bin
EVAL_STAMP := $(EVAL_VENV)/.dymu-installed
EVAL_PIP := $(EVAL_BIN)/pip install --quiet --disable-pip-version-check
eval-setup: $(EVAL_STAMP)

$(EVAL_STAMP): pyproject.toml constraints-eval.txt
	test -x $(EVAL_BIN)/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_PIP) "$(TORCH_SPEC)"
	$(EVAL_PIP) -c constraints-eval.txt -e '.[eval,test]'
	$(EVAL_BIN)/pip uninstall --yes --quiet torchvision timm
	$(EVAL_BIN)/python -m dymu.evaluation.check
	touch $(EVAL_STAMP)

# The tests that need lmms-eval (tests/test_evaluation_lmms.py; about 3 minutes), in the eval venv.
eval-test: $(EVAL_STAMP)
	$(EVAL_BIN)/python -m pytest -q tests/test_evaluation_lmms.py tests/test_evaluation.py

bench: $(STAMP)
	$(BIN)/python benchmarks/encoder_speed.py

clean:
	rm -rf $(VENV) $(EVAL_VENV) dymu-demo .pytest_cache
