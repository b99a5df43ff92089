"""llmray: build a language model from raw text on Ray, from a laptop to a cluster.

Kept tiny on purpose: importing ``llmray`` must not import torch or Ray.
"""

__version__ = "0.1.0"
