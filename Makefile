# wl_infer: everything here needs only Python 3.8+ (standard library).
PYTHON ?= python3

.PHONY: test faults demo sandbox bench realmodel compat lint

RUFF = ruff check --isolated --select E,F,W,B --ignore B904,B905

# The whole suite, against the built-in fake Ollama and fake wl.
test:
	$(PYTHON) test_wl_infer.py

# Only the fault matrix and the hostile-input tests, with their tally:
# faults tried, claims leaked, results lost, malformed inputs refused.
faults:
	$(PYTHON) test_wl_infer.py faults

# post -> run -> verify -> status, as a user sees it, against the fakes.
demo:
	$(PYTHON) test_wl_infer.py demo

# The fakes, running until Ctrl-C, for trying the README's commands by hand:
# paste the export line it prints into another shell.
sandbox:
	@$(PYTHON) test_wl_infer.py sandbox

# Ratios against baselines measured in the same run (not part of test).
bench:
	$(PYTHON) bench_wl_infer.py

# post -> run -> verify (exact, tolerant, sampled) and forgeries on a real model
# (../shared/realmodel; says how to set it up when it is not). Not part of test.
realmodel:
	$(PYTHON) bench_wl_infer.py realmodel

# The suite on the oldest and newest supported Pythons, when installed.
compat:
	@for v in 3.8 3.13; do \
	  py=; for c in $$(ls -d $$HOME/.pyenv/versions/$$v.*/bin/python3 2>/dev/null) $$(command -v python$$v); do \
	    if "$$c" -c 'import sys' >/dev/null 2>&1; then py=$$c; break; fi; done; \
	  if [ -n "$$py" ]; then echo "== Python $$v ($$py)"; "$$py" test_wl_infer.py || exit 1; \
	  else echo "== Python $$v not installed: skipped"; fi; \
	done

# Optional, development only: needs ruff (pip install ruff).
lint:
	$(RUFF) --line-length 99 wl_infer.py
	$(RUFF) --line-length 120 test_wl_infer.py bench_wl_infer.py
