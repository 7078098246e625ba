# Set-up is part of every target: a virtual environment in .venv with the package,
# its test extras and a pinned CPU build of torch (override TORCH= to use another).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench bench-distill bench-maml bench-peers bench-gpu lint docs clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/distill.py

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) benchmarks/hypergrad.py --json benchmarks/results/cpu.json --threads 1

bench-distill: $(STAMP)
	$(PY) benchmarks/distill.py --json benchmarks/results/distill_cpu.json --threads 1

# the peers of the meta-learning benchmark (learn2learn does not build on Python 3.11:
# benchmarks/maml.py --l2l-src DIR loads it from its unpacked sdist)
bench-maml: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/maml.py --json benchmarks/results/maml_cpu.json --threads 1

# the library side by side with torchopt, higher and hand-written references (one thread,
# interleaved); benchmarks/check_peers.py fails when a ratio is past its target
bench-peers: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	OMP_NUM_THREADS=1 $(PY) benchmarks/peers.py --json benchmarks/results/peers_cpu.json

# the CUDA checks and benchmarks in one run (< 8 minutes): it uses .venv or the system python,
# whichever has a CUDA torch, and installs nothing (so no $(STAMP), which pins a CPU torch)
bench-gpu:
	bash benchmarks/gpu.sh --json benchmarks/results/gpu.json

# the documentation site, built strictly (broken links, docstring warnings fail) into site/;
# its packages (the docs extra) are installed only for this target
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

lint: $(STAMP)
	$(PY) -m ruff check hypergrad bilevel tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info site
