"""Recipes: one file per job, each ``run(cfg)`` a readable loop."""
