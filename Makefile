# Fresh clone: `make demo` and `make test` need only python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: golden-record golden-check install test test-fast lint format docs demo light-check airflow-check bench-calibrate calibrate calibrate-photos bench bench-scale bench-gpu gpu-wheels bench-storage bench-against bench-keep bench-transfer bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,clip]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (Ray, fault injection, schedules, S3-heavy, large
# end-to-end runs): a few minutes, for the edit-test loop. `make test` runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The layers' one-way rule (import-linter contracts in pyproject.toml) is part of lint.
lint: $(STAMP)
	$(BIN)/ruff check dedup tests benchmarks examples
	$(BIN)/ruff format --check dedup tests benchmarks examples
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix dedup tests benchmarks examples
	$(BIN)/ruff format dedup tests benchmarks examples

# The documentation site (docs/, mkdocs.yml) into site/, every link checked (--strict).
# The reference pages import dedup, so the site is built in the test venv with the docs
# extra added (CI has made it already for `make test`).
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: $(STAMP)
	rm -rf demo-data
	$(BIN)/python -m dedup.synth demo-data/shards 200 100
	@echo "demo: dedup demo-data/shards --out demo-data/clean"
	$(BIN)/dedup demo-data/shards --out demo-data/clean
	@echo "report: demo-data/clean/dedup-report/report.html (and summary.json, samples.parquet, clusters.parquet)"

# Defined before the first target that needs it: make expands a prerequisite when it
# reads the rule, so a later definition would leave that target with none.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

# The scripts of every bench, calibrate and golden target at a tiny size (--smoke), as
# `make test` runs them too (tests/benchmarks/test_bench_smoke.py, about two minutes).
bench-smoke: $(STAMP)
	$(BIN)/python -m pytest -q tests/benchmarks

calibrate: $(STAMP)
	$(BIN)/python benchmarks/calibrate_phash.py

# pHash distances on the real photographs bundled with the bench extra's packages, and
# the tiny-image rule's effect (README: "The pHash threshold on real photographs").
calibrate-photos: $(BENCH_STAMP)
	$(BIN)/python benchmarks/calibrate_photos.py
	$(BIN)/python benchmarks/tiny_images.py

# CPU throughput against the decode floor and imagededup; builds bench-data/ once.
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench.py

# CLIP on a GPU: decode and model ceilings, then dedup end to end against the Pillow
# path (random ViT-B-32 weights; about 6 minutes on one H200).
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py

# Wheels (Python 3.12) of what a bare GPU machine with torch lacks, for
# benchmarks/gpu_device.sh there; .whl/ is ignored by git (the device tool carries it).
gpu-wheels:
	rm -rf .whl && mkdir .whl
	for p in open_clip_torch ftfy wcwidth faiss-cpu imagehash PyWavelets blake3 braceexpand; do \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $$p || exit 1; \
	done

# Local disk against a local S3-compatible server, same data, same run.
# A 24,000-image run against a 1,000,000-code index and a 10,000-image folder.
bench-against: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_against.py

# What canaries cost a run, and dedup calibrate on the edit suite's photographs.
bench-calibrate: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_calibrate.py

# Which sample of each duplicate group survives, per --keep policy: the original (or its
# lossless copy) or a padded, captioned, screenshot, watermarked, noisy or smaller copy of
# it (web-style copies of the bench extra's photographs; builds bench-data/bench-keep/ once).
bench-keep: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_keep.py

# Does dedup calibrate transfer? Its per-edit estimates on bench-keep's originals against
# a real run over bench-keep's own copies of them (held-out draw 1).
bench-transfer: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_transfer.py --seed 1

bench-storage: $(STAMP)
	$(BIN)/python benchmarks/bench_storage.py

# The partitioned global phase at 1 and 10 million pHash codes of real photographs
# (against the one-process engine it replaced), then extract and write on Ray against
# local processes on the bench set. Builds bench-data/codes/ once (minutes).
bench-scale: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_scale.py 1000000 10000000 --clip 200000
	$(BIN)/python benchmarks/bench_ray.py

clean:
	rm -rf demo-data bench-data .pytest_cache

# The light install: `pip install dedup-wds` without extras has no torch, and a run with
# the default signals works (exact,phash,views; one log line says why CLIP is off).
light-check:
	rm -rf .venv-light demo-data/light demo-data/light-clean
	$(PY) -m venv .venv-light
	.venv-light/bin/python -m pip install -q .
	! .venv-light/bin/python -c "import torch" 2>/dev/null
	.venv-light/bin/python -m dedup.synth demo-data/light 60 30
	.venv-light/bin/dedup demo-data/light --out demo-data/light-clean --json > demo-data/light.json
	.venv-light/bin/python -c "import json; s = json.load(open('demo-data/light.json')); \
	assert s['config']['signals'] == ['exact', 'phash', 'views'], s['config']['signals']; \
	assert s['counts']['removed'] > 0; print('light install: ok,', s['counts']['removed'], 'removed')"

# The example Airflow DAGs (examples/airflow/) under `airflow dags test`, with Apache
# Airflow in its own virtual environment (never in the project's dependencies).
AIRFLOW_VENV := .venv-airflow
airflow-check: $(STAMP)
	test -x $(AIRFLOW_VENV)/bin/airflow || { $(PY) -m venv $(AIRFLOW_VENV) && \
	$(AIRFLOW_VENV)/bin/python -m pip install -q apache-airflow; }
	sh examples/airflow/check.sh

# Golden outputs: a restructuring changes no output byte (benchmarks/golden.py).
golden-record: $(STAMP)
	$(BIN)/python benchmarks/golden.py record bench-data/golden.json

golden-check: $(STAMP)
	$(BIN)/python benchmarks/golden.py check bench-data/golden.json
