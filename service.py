"""BentoML entry point of a checkout (``bentoml build``, ``bentoml serve service:MicroVerse``).

The service itself ships inside the package, in :mod:`microverse.service`.
"""

from microverse.service import MicroVerse

__all__ = ["MicroVerse"]
