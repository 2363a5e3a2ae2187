"""Steering estimators: each turns pooled (source, target) samples into an AffineMap.

Every method is one module here that registers itself; `get_method` and `METHODS` are the
registry that `actsteer.fit(method=...)` and `actsteer fit --method` read.
"""

# Importing the method modules fills the registry.
from actsteer.methods import actadd, aura, gaussian_act, iti_c, linear_act, mean_act  # noqa: E402, F401, I001
from actsteer.methods.registry import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register"]
