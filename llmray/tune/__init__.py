"""Ray Tune over any config key of any stage: sweeps, proxy models and data ablations.

* :mod:`~llmray.tune.space` — the search space: dotted config keys → Tune domains;
* :mod:`~llmray.tune.trial` — what one trial runs: its stages, sharing unchanged ones through
  the lineage cache, reporting their metrics to Tune as they are written (the unit of a sweep is
  usually the ``proxy`` stage: pretraining of a small model in the trial's own process);
* :mod:`~llmray.tune.sweep` — the ``tune`` stage: Tuner, search, schedulers, resume;
* :mod:`~llmray.tune.results` — the trial table, the best config as YAML, plots;
* :mod:`~llmray.tune.ablation` — per-trial lineage: which stages a trial ran or reused.
"""
