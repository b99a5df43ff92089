"""Evaluation: task registry (tasks.py) and lm-evaluation-harness task YAMLs (lm_eval_tasks.py),
prompts and requests (prompts.py), the model worker with shared-context scoring (worker.py),
scoring and the CORE aggregate (scoring.py), the actor-pool runner (runner.py), the ``eval``
stage (stage.py), its result files (results.py, lm_eval_results.py) and background evaluation
of training checkpoints (background.py)."""
