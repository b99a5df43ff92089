"""Training: the one training core (``trainer.py``) and the one way to launch it (``launch.py``).

Pretraining and the proxy (``pretrain.py``), SFT and DPO (:mod:`llmray.align`) are objectives and
data on that launch. Ray appears only in ``ray_train.py`` and in the in-training evaluation's
coordinator (``periodic_eval.py``); everything else runs and is tested in a single process.
"""
