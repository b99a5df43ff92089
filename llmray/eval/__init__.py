"""Evaluation: task registry (tasks.py), prompts and requests (prompts.py), the model worker
(worker.py), scoring and the CORE aggregate (scoring.py), the actor-pool runner (runner.py), the
``eval`` stage (stage.py) and background evaluation of training checkpoints (background.py)."""
