# The two commands a fresh machine needs: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
.PHONY: setup demo test test-fast bench clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m ruff check dcn_det tools tests benchmarks setup.py
	$(PY) -m pytest -q -ra tests

# the edit-test loop: everything but the tests marked slow (make test and CI run those too)
test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf work_dirs
