"""RECO: retrieval-enhanced contrastive vision-text models (Iscen et al., ICLR 2024).

The library is importable on its own; the CLI (`reco`) and the Celery workers are thin layers over it.
"""

__version__ = "0.1.0"
