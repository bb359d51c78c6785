# The two commands a fresh machine needs: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
.PHONY: setup demo test lint bench bench-ops bench-models bench-accuracy bench-digits clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m ruff check dcn_det tools tests benchmarks configs
	$(PY) -m pytest -q -ra tests

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf work_dirs
