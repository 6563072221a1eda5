# One entry point for everything. Each target bootstraps the .venv it needs on first use;
# the stamp makes the second run install nothing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
PROTO_OUT := protos/genrec/v1/recommender_pb2.py

# CPU machines get the +cpu torch build and fbgemm-gpu-cpu; a machine with CUDA the CUDA builds.
# Where the +cpu wheel is not on a local index, add PyTorch's own:
#   make test PIP_TORCH_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
TORCH_SPEC  ?= torch==2.13.0
FBGEMM_SPEC ?= fbgemm-gpu==1.8.0
else
TORCH_SPEC  ?= torch==2.13.0+cpu
FBGEMM_SPEC ?= fbgemm-gpu-cpu==1.8.0
endif
TORCHREC_SPEC ?= torchrec==1.8.0
PIP_TORCH_ARGS ?=

CONFIG ?= configs/ml-1m/hstu.yaml
RUN    ?= runs/latest
PORT   ?= 50051
ARTIFACT ?= runs/latest/export
ARGS   ?=
NPROC  ?= 1

.PHONY: help venv protos data data-synthetic train test test-slow test-all lint eval serve notebook \
        bench-kernel bench-train bench-scale bench-serve bench-engine bench-data bench-eval bench-epoch bench-histories bench-catalogue bench-memory clean

help:
	@echo "make train       prepare the dataset CONFIG names (ML-1M by default), train ($(CONFIG)), evaluate, export"
	@echo "                 (ARGS='key=value ...', NPROC=)"
	@echo "make test        the default test suite (what CI runs)"
	@echo "make test-slow   the slow tests (network download, long training)"
	@echo "make test-all    every test this machine can run (GPU tests skip without CUDA)"
	@echo "make lint        ruff"
	@echo "make data        prepare the dataset CONFIG names (default: download and prepare MovieLens-1M)"
	@echo "make data-synthetic  generate and preprocess the synthetic dataset (ARGS='--num-users N ...')"
	@echo "make eval        evaluate a run (RUN=runs/<name>)"
	@echo "make serve       gRPC server on 127.0.0.1:$(PORT) for ARTIFACT=$(ARTIFACT)"
	@echo "make notebook    open notebooks/offline_evaluation.ipynb"
	@echo "make bench-kernel | bench-train | bench-scale | bench-serve | bench-engine   (NPROC=, ARGS=)"
	@echo "make bench-data  streaming data preparation at 10M / 30M / 100M synthetic events (ARGS=)"
	@echo "make bench-epoch the first epoch and one validation pass at 100M events / 10M users / 10M items (GPU)"
	@echo "make bench-memory  peak device memory per step with and without activation checkpointing at N=4096 and 200 (GPU)"
	@echo "make bench-histories  the export's memory-mapped history store at 10M users: write, open, lookups, RSS"
	@echo "make bench-eval  ranking users against 10M items: item blocks vs the whole score matrix (ARGS=)"
	@echo "make bench-catalogue  retrieval from 1M / 10M items: exact vs the ivf and hnsw indexes (ARGS=)"
	@echo "make clean       caches and generated gRPC code (not .venv, datasets/ or runs/)"

# --- environment -----------------------------------------------------------------------------
$(STAMP): requirements/lock.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)" "$(FBGEMM_SPEC)"
	$(PY) -m pip install -q -r requirements/lock.txt
	@# torchrec's metadata pulls the CUDA fbgemm-gpu next to fbgemm-gpu-cpu, which then breaks
	@# `import fbgemm_gpu`; its real needs are pinned in the lock instead.
	$(PY) -m pip install -q --no-deps "$(TORCHREC_SPEC)"
	$(PY) -c "import torch, torchrec, fbgemm_gpu, triton, grpc; print('environment ready: torch', torch.__version__)"
	@touch $@

venv: $(STAMP)

protos: $(PROTO_OUT)
$(PROTO_OUT): protos/genrec/v1/recommender.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/genrec/v1/recommender.proto

# --- main jobs -------------------------------------------------------------------------------
# The data section of CONFIG, with the data.* overrides of ARGS (training's --flags are left out).
# A step of its own: training only opens what this prepared, and refuses to start without it.
data: $(STAMP)
	$(PY) -m data.prepare --config $(CONFIG) $(filter data.%,$(ARGS))

data-synthetic: $(STAMP)
	$(PY) -m data.prepare --dataset synthetic $(ARGS)

train: data
	$(PY) -m torch.distributed.run --standalone --nproc-per-node=$(NPROC) -m training.train \
		--config $(CONFIG) $(ARGS)

eval: $(STAMP)
	$(PY) -m training.evaluate --run $(RUN) $(ARGS)

serve: $(STAMP) protos
	$(PY) -m serving.server --artifact $(ARTIFACT) --port $(PORT) $(ARGS)

NOTEBOOK_SPEC ?= notebook==7.6.5
notebook: $(STAMP)
	@$(PY) -c "import notebook" 2>/dev/null || $(PY) -m pip install -q "$(NOTEBOOK_SPEC)"
	$(VENV)/bin/jupyter notebook notebooks/offline_evaluation.ipynb

# --- tests -----------------------------------------------------------------------------------
test: $(STAMP) protos
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP) protos
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "slow or network" $(ARGS)

test-all: $(STAMP) protos
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# --- benchmarks (each prints a table and the command that reproduces it) -----------------------
bench-kernel: $(STAMP)
	$(PY) -m benchmarks.kernel $(ARGS)

bench-train: data
	$(PY) -m benchmarks.train --nproc $(NPROC) $(ARGS)

bench-scale: $(STAMP)
	$(PY) -m data.prepare --config configs/scale/hstu-10m.yaml
	$(PY) -m benchmarks.train --suite scale --nproc $(NPROC) $(ARGS)

bench-memory: $(STAMP)
	$(PY) -m data.prepare --config configs/scale/long-history.yaml
	$(PY) -m benchmarks.train --suite memory --steps 10 $(ARGS)
	$(PY) -m benchmarks.train --suite memory --steps 10 model.max_seq_len=200 $(ARGS)

bench-serve: $(STAMP) protos
	$(PY) -m benchmarks.serve $(ARGS)

bench-engine: $(STAMP) protos
	$(PY) -m benchmarks.engine $(ARGS)

bench-data: $(STAMP)
	$(PY) -m benchmarks.data $(ARGS)

bench-eval: $(STAMP)
	$(PY) -m benchmarks.evaluate $(ARGS)

bench-histories: $(STAMP)
	$(PY) -m benchmarks.histories $(ARGS)

bench-catalogue: $(STAMP) protos
	$(PY) -m benchmarks.catalogue $(ARGS)

# The 100M-event log is written once (1.1 GB, datasets/raw/) and prepared once (data.prepare's cache).
EPOCH_CONFIG ?= configs/scale/events-100m.yaml
bench-epoch: $(STAMP)
	test -f datasets/raw/events-100m.parquet || $(PY) -m data.synthetic --out datasets/raw/events-100m.parquet \
		--num-users 10000000 --num-items 10000000 --mean-length 10 --min-item-events 1
	$(PY) -m data.prepare --config $(EPOCH_CONFIG)
	$(PY) -m benchmarks.epoch --config $(EPOCH_CONFIG) --nproc $(NPROC) $(ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache protos/genrec/v1/*_pb2*.py protos/genrec/v1/*_pb2*.pyi
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
