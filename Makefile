# The two commands a newcomer needs:
#   make demo   set up (.venv, pip, offline models) and run the main job on a local Ray
#   make test   run the test suite (CPU; real Ray, vLLM, DeepSpeed)
PY := .venv/bin/python
RUN_DIR ?= runs/quickstart

.PHONY: setup demo test test-slow lint

setup:
	bash launch/setup.sh

demo: setup
	.venv/bin/rlhf-ray pipeline launch/configs/quickstart.yaml run_dir=$(RUN_DIR)

test:
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow:
	$(PY) -m pytest -q -m slow

lint:
	.venv/bin/ruff check rlhf_ray tests
