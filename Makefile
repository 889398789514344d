# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit lint bench-model bench-model-memory bench-data bench-train bench-ds-step bench-serve bench-serve-scale bench-gpu-serve bench-gpu-serve-proxy bench-eval bench-scale bench-finetune bench-instruct-evidence bench-search bench-gpu-train profile-suite clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel when no CUDA is present (an unpinned torch pulls a multi-GB CUDA build)
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch>=2.4"; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) jobs/demo.py

# the package's bytecode first: the suite's hundreds of processes (Ray workers, jobs) read it instead of compiling the
# sources each, which they do where PYTHONDONTWRITEBYTECODE is set (an editable install is not byte-compiled)
test: install
	$(PY) -m compileall -q blip2_ray jobs > /dev/null
	DS_ACCELERATOR=cpu $(PY) -m pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder tests

test-unit: install
	$(PY) -m pytest -q tests/unit

# ruff (style, imports, unused names; config in pyproject.toml), then no import cycle inside the package
lint: install
	$(PY) -m ruff check .
	$(PY) tools/check_import_cycles.py blip2_ray

bench-model: install
	$(PY) bench/bench_model.py

bench-model-memory: install
	$(PY) bench/bench_model_memory.py

bench-data: install
	$(PY) bench/bench_data.py

bench-train: install
	DS_ACCELERATOR=cpu $(PY) bench/bench_train.py

bench-ds-step: install
	DS_ACCELERATOR=cpu $(PY) bench/bench_ds_step.py

# paper-size stage 2, ZeRO-2 vs ZeRO-3 per-worker peak memory (needs ~20 GiB free; BENCH_SCALE_ARGS="--depth 8" is lighter)
bench-scale: install
	DS_ACCELERATOR=cpu $(PY) bench/bench_scale.py $(BENCH_SCALE_ARGS)

bench-serve: install
	$(PY) bench/bench_serve.py

bench-serve-scale: install
	$(PY) bench/bench_serve_scale.py $(ARGS)

# one call on a GPU machine (docs/serving.md has the exact command); OUT=DIR also writes DIR/gpu_serve.json
bench-gpu-serve: install
	$(PY) bench/gpu_serve.py --device cuda $(if $(OUT),--out $(OUT)) $(ARGS)

# the CPU proxy of bench-gpu-serve: 32 OPT blocks of width 64, eager vs compiled decode step
bench-gpu-serve-proxy: install
	$(PY) bench/gpu_serve.py --device cpu $(ARGS)

bench-eval: install
	$(PY) bench/bench_eval.py

bench-finetune: install
	DS_ACCELERATOR=cpu $(PY) bench/bench_finetune.py

# instruction tuning's evidence at tiny size: held-in and held-out (zero-shot) gains over seeds 0 1 2 (~10 min a seed)
bench-instruct-evidence: install
	$(PY) bench/instruct_evidence.py $(ARGS)

# index job vs a single-process loop; exact and IVF-PQ latency, recall@10 and bytes/image at 1e4-1e6 synthetic
# images (the 1e6 point needs ~4 GiB and takes tens of minutes on 2 cores; ARGS="--sizes 1e4,1e5" is quicker)
bench-search: install
	$(PY) bench/bench_search.py $(ARGS)
# training on a GPU: model step eager / compiled and the whole job per micro batch (docs/training.md); without a GPU
# the real-depth tiny-width CPU proxy (compiled / eager host time per step); ARGS="--rehearse" rehearses the GPU rows
bench-gpu-train: install
	$(PY) bench/gpu_train.py $(ARGS)

# the suite's CPU by process kind (pytest, each Ray actor class, raylet, Java...) and its 25 costliest tests:
# tools/suite_cpu.py
profile-suite: install
	DS_ACCELERATOR=cpu $(PY) tools/suite_cpu.py --by-test 25 -- $(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) demo_out runs
