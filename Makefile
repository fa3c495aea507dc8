# florenz-fast: set-up, tests and the main job, all in a pinned virtual environment (.venv).
#
#   make train   # sets up .venv (pinned), then runs the main job on its default (tiny model, CPU)
#   make test    # sets up .venv (pinned), then runs the lint and the test suite; PYTEST_ARGS="..." passes options
#   make test-fast  # the inner loop: lint, then the tests not marked `slow` (-m "not slow")
#   make lint    # ruff check (lint + import order; config in pyproject.toml, version pinned in requirements.txt)
#
# Set-up is stamped: .venv/.stamp-install is newer than requirements.txt, setup.py, pyproject.toml
# and the version file, so a second run installs nothing. A fresh set-up takes ~90 s here.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-install
PIP    := $(VPY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: venv setup lint test test-fast train clean distclean

venv setup: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# The CUDA extension florenz_fast._C (csrc/) is built by the editable install with the pip CUDA toolkit of
# requirements.txt (cuda-toolkit[nvcc,cccl]; /usr/local/cuda lacks headers torch includes): no GPU needed.
# FLORENZ_REQUIRE_CUDA_EXT=1 makes setup.py fail instead of falling back to pure Python, and makes
# tests/test_decode_build.py fail if the extension does not load, so a compile error in csrc fails CI.
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS ?= 2
REQUIRE_CUDA_EXT ?= 1
CUDA_ENV = cu=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13; \
	export CUDA_HOME=$$cu PATH=$$cu/bin:$$PATH TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
	MAX_JOBS=$(MAX_JOBS) FLORENZ_REQUIRE_CUDA_EXT=$(REQUIRE_CUDA_EXT)
CSRC := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.cpp csrc/*.h)

# requirements.txt pins setuptools too, which the editable install then builds with (no isolation,
# so the build sees the venv's torch, which the CUDA extension is compiled against).
$(STAMP): requirements.txt setup.py pyproject.toml florenz_fast/__init__.py $(CSRC) | $(VPY)
	$(PIP) install -q --progress-bar off -r requirements.txt
	@$(CUDA_ENV); echo "make: building florenz_fast._C (CUDA_HOME=$$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$$TORCH_CUDA_ARCH_LIST)"; \
	$(PIP) install -q --progress-bar off --no-build-isolation -e .
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collects no tests; that is a failure here, said in so many words.
PYTEST = FLORENZ_REQUIRE_CUDA_EXT=$(REQUIRE_CUDA_EXT) $(VPY) -m pytest -q
NO_TESTS = if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests (exit 5); treated as a failure" >&2; fi; exit $$rc

test: lint
	@$(PYTEST) $(PYTEST_ARGS); rc=$$?; $(NO_TESTS)

test-fast: lint
	@$(PYTEST) -m "not slow" $(PYTEST_ARGS); rc=$$?; $(NO_TESTS)

train: $(STAMP)
	$(VPY) -m florenz_fast.train

# Build artifacts only (keeps .venv). Drops the install stamp too, since an in-place extension
# built by the editable install would be removed here; the next make re-runs the (quick) install.
clean:
	rm -rf build dist *.egg-info .pytest_cache $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find florenz_fast kernels -name '*.so' -type f -delete

distclean: clean
	rm -rf $(VENV)
