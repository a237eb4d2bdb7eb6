"""The driver's parts, which the recipes compose: the run lifecycle (``run``), the workers of
each role (``roles``), training data and its order (``batches``), sharded calls to the
learners (``learners``), prompts (``prompts``), held-out evaluation (``evaluation``), what is
done with scored episodes (``episodes``), the episode stream of online RL (``stream``) and
scaling rollout workers while a job runs (``scaling``)."""
