# make demo  : the five stages on the built-in synthetic sketches (CPU, a few minutes)
# make test  : the whole test suite (installs Debian's chromium for the browser tests where it can)
# make bench : the benchmarks; rewrites bench/RESULTS.md
# make install / figures / clean : the venv alone; the README's figures; delete runs, neuron_report and cache
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench figures install clean chromium

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train_standard_cnn.py --overwrite=True --epochs=8
	$(PY) train_sae.py --overwrite=True
	$(PY) sae_summarize.py --overwrite=True
	$(PY) sae_summary_to_llm.py --backend=offline
	$(PY) why_did_you.py --image=test:0 --overlay=neuron_report/why_test0.png
	@echo "neuron atlas: file://$(CURDIR)/neuron_report/index.html"

test: $(STAMP) chromium
	$(PY) -m pytest

# the browser tests (the atlas, the draw page) need Chromium: installed with apt where it is missing and
# allowed (Debian/Ubuntu as root); elsewhere install it yourself, or those tests fail and say so
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ( (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "warning: could not install chromium; the browser tests will fail (install it: apt-get install chromium)" )

bench: $(STAMP)
	$(PY) -m pip install --quiet --no-deps -r bench/requirements-bench.txt
	$(PY) bench/run_all.py

figures: $(STAMP)
	$(PY) assets/make_figures.py

clean:
	rm -rf runs neuron_report cache
