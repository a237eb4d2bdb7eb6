# The two commands a newcomer needs:
#   make demo   set up (.venv, pip, offline models) and run the main job on a local Ray
#   make test   run the test suite (CPU; real Ray, vLLM, DeepSpeed)
PY := .venv/bin/python
RUN_DIR ?= runs/quickstart

.PHONY: setup demo test test-slow lint bench

setup:
	bash launch/setup.sh

# a second demo moves the previous run aside (RUN_DIR.<time>) instead of refusing or overwriting it
demo: setup
	@if [ -e $(RUN_DIR) ]; then mv $(RUN_DIR) $(RUN_DIR).$$(date +%Y%m%d-%H%M%S); fi
	.venv/bin/rlhf-ray pipeline launch/configs/quickstart.yaml run_dir=$(RUN_DIR)

test:
	$(PY) -m pytest -q --durations=30; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow:
	$(PY) -m pytest -q -m slow

lint:
	.venv/bin/ruff check rlhf_ray tests

# speed against a peer measured in the same run (bench/RESULTS.md); its length goes to bench/results/make_bench_time.txt
bench:
	@start=$$(date +%s); \
	$(PY) bench/learner_throughput.py && \
	$(PY) bench/rollout_throughput.py --dtype bfloat16 --compile --interleave --repeats 3 --compare-attention && \
	$(PY) bench/grpo_vs_trl.py --steps 5 --variants fused && \
	$(PY) bench/streaming.py --steps 3 --no-all-cores && \
	$(PY) bench/sft_dpo_vs_trl.py && \
	$(PY) bench/reward_endpoint.py && \
	echo "make bench: $$(( $$(date +%s) - start )) s" | tee bench/results/make_bench_time.txt
