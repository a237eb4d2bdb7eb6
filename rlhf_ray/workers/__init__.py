"""Ray actors, one class per role. Heavy imports (vllm, deepspeed) live only in this package."""
