"""The main job: its stages (one module each), their cache keys and typed results, and `run` (pipeline/run.py)."""
