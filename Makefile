# Two entry points: `make demo` and `make test`. Each does all the set-up it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint data bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,onnx]"
	touch $(STAMP)

# Fashion-MNIST from Debian's package when it is missing (torchvision's download is the fallback
# at run time, see fxcondensa/data.py).
data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: $(STAMP) data
	$(PY) examples/lenet5.py

test: $(STAMP) data
	$(PY) -m pytest -n 2 -q tests fxcondensa --doctest-modules

lint: $(STAMP)
	$(PY) -m ruff check fxcondensa tests examples bench

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/test_fuzz.py tests/test_thin_properties.py tests/test_fuzz_architectures.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
