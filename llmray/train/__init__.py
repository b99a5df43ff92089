"""Training: the one training core (trainer.py) that pretraining, SFT and DPO configure.

Ray appears only in ``ray_train.py``; everything else runs and is tested in a single process.
"""
