# cervspine — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/synthetic_demo_v5
PYTEST_ARGS ?=

.PHONY: help install demo demo-quality print-demo-synth test test-slow test-viewer bench gpu-check rehearsal lint format fuzz clean browser dicom-tools

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install cervspine with its test extras

# 128² keeps the demo on a CPU; its pixels (1.4–1.9 mm) are ~5× RSNA's, so the demo's obvious breaks are
# drawn 6–10 mm wide to span the 3–6 px that 1–2 mm breaks span at 512² (generator default: 1.5–4.5 mm).
# variant=mixed draws each study's generator variant (the historic one, each cue-removing option alone, all of
# them: one C3–C7 shape family, random z-coverage to scale, FOV and position, 0.5–3 mm slices, subtle
# fractures of 1–2 cache pixels, a neck outline not tied to the levels), so no level can be told by its
# size, the soft tissue around it or its place in the stack. 300 training studies, not 150: both stages
# draw a fixed number of samples per epoch, so twice the studies cost only synthesis and preprocessing
# time (~1.5 min) and halved the held-out gap (experiments/demo_quality.md).
DEMO_SYNTH ?= n_train=300 n_test=10 size=128 seed=0 seg_fraction=0.3 workers=2 variant=mixed \
	'fracture_gap_mm=[6,10]' 'fracture_shift_mm=[6,10]'
DEMO_ARGS ?=

demo: $(STAMP) ## synthesize an RSNA-format folder (once), then run the whole pipeline on it
	@test -f $(DEMO_DIR)/synthetic_manifest.csv || $(PY) -m cervspine.synthesize out=$(DEMO_DIR) $(DEMO_SYNTH)
	WANDB_MODE=offline $(PY) -m cervspine.pipeline data.root=$(DEMO_DIR) experiment=demo $(DEMO_ARGS)

print-demo-synth:
	@echo $(DEMO_SYNTH)

demo-quality: $(STAMP) ## score the last demo run on a held-out folder of every generator variant (experiments/demo_quality_variants.*)
	$(PY) -m experiments.demo_quality --train $(DEMO_DIR)

browser: ## headless Chromium for the report browser test (root + apt-get only; failure ignored)
	@if [ -x /usr/bin/chromium ]; then echo "chromium: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			|| echo "chromium could not be installed: the browser test will be skipped"; \
	else echo "not root or no apt-get: no chromium, the browser test will be skipped"; fi

dicom-tools: ## Orthanc (+ DICOMweb), dcmtk, dicom3tools, npm for the DICOM and viewer tests (root + apt-get only; failure ignored)
	@if [ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v storescu >/dev/null \
		&& command -v dciodvfy >/dev/null && command -v npm >/dev/null; then \
		echo "orthanc, orthanc-dicomweb, dcmtk, dicom3tools, npm: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dcmtk dicom3tools \
			$$(command -v npm >/dev/null || echo npm)) \
			|| echo "orthanc/orthanc-dicomweb/dcmtk/dicom3tools/npm could not be installed: the tests that need them will be skipped"; \
	else echo "not root or no apt-get: no Orthanc/dcmtk/dicom3tools, the tests that need them will be skipped"; fi

test: $(STAMP) ## the whole test suite (what CI runs); PYTEST_WORKERS=0 runs it in one process
	$(PY) -m pytest -q -m "not slow" -n $(or $(PYTEST_WORKERS),2) --dist loadfile $(PYTEST_ARGS)

test-viewer: $(STAMP) ## the real-viewer test alone (Orthanc + OHIF in Chromium); screenshots in outputs/test-artefacts/viewer/
	$(PY) -m pytest -q -m viewer $(PYTEST_ARGS)

test-slow: $(STAMP) ## the slow tests (learning checks, longer fault injection)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

FUZZ_SECONDS ?= 600
fuzz: $(STAMP) ## fuzz the DICOM reader for FUZZ_SECONDS (failures are kept in .hypothesis/)
	CERVSPINE_FUZZ_SECONDS=$(FUZZ_SECONDS) RUST_BACKTRACE=0 $(PY) -m pytest -q -s -m slow \
		tests/test_reliability_fuzz.py $(PYTEST_ARGS)

REHEARSAL_ARGS ?=
rehearsal: $(STAMP) ## experiment=rsna at real sizes on synthetic studies (GPU ~8 min; CPU ~15 min: --mode cpu) → experiments/rehearsal.md
	WANDB_MODE=offline $(PY) -m experiments.rehearsal $(REHEARSAL_ARGS)

bench: $(STAMP) ## benchmarks; results in experiments/benchmarks/RESULTS.md
	$(PY) -m experiments.benchmarks.run_all

GPU_CHECK_ARGS ?=
gpu-check: $(STAMP) ## the GPU figures of the real recipes, ≤8 min on one H100, no network → experiments/benchmarks/gpu_check.{json,md}
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(PY) -m experiments.benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check cervspine tests experiments
	$(VENV)/bin/ruff format --check cervspine tests experiments

format: $(STAMP) ## ruff format + fixes
	$(VENV)/bin/ruff check --fix cervspine tests experiments
	$(VENV)/bin/ruff format cervspine tests experiments

.PHONY: kaggle-kit
KIT_ARGS ?=
kaggle-kit: $(STAMP) ## offline Kaggle kit of a run: wheels, checkpoints, kaggle_predict.py (RUN=<run dir> OUT=<dir>)
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make kaggle-kit RUN=<pipeline run dir> OUT=<dir> [KIT_ARGS=--no-wheels]"; exit 2; }
	$(PY) -m cervspine.kaggle.kit $(RUN) $(OUT) $(KIT_ARGS)

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
