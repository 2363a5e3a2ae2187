"""Steering estimators: each turns pooled (source, target) samples into a map (actsteer.maps).

Every method is one module in this package that registers itself (`register(Method(...))`);
the package imports all its modules, so adding an estimator is adding one file here. `METHODS`
and `get_method` are the registry that `actsteer.fit(method=...)` and `actsteer fit --method`
read.
"""

import importlib
import pkgutil

from actsteer.methods.registry import METHODS, Method, get_method, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "get_method", "register"]
