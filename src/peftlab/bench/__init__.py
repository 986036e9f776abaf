"""`peftlab bench`: measured speed and memory of our execution against the original study's recipe.

- `workload`: one run's spec, the profiles, the workload as a study config, MFU arithmetic.
- `reference`: the original study's TRL recipe on the same rows.
- `worker`: one run in a fresh process (peak-memory counters never mix).
- `train`: `peftlab bench train`, the driver that plans runs and writes the JSON report.
- `plots`: the report's figures.
- `generate`: `peftlab bench generate`, decoding speed of the evaluator against plain `generate`.
"""
