"""LinEAS: the AcT maps of every chosen module trained jointly, end to end (actsteer.lineas).

Registered like every method so `actsteer methods`, `fit(method="lineas")`, λ, supports and the
artifact know it; `trained=True` makes `fit` hand it to the trainer instead of estimating each
module alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actsteer.errors import ActSteerError
from actsteer.methods.registry import Method, register

if TYPE_CHECKING:
    import torch


def _not_per_module(
    source: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    raise ActSteerError(
        "lineas trains all modules' maps jointly through the model and has no per-module "
        "estimate; fit it with actsteer.fit(model, tok, source=..., target=..., method='lineas')"
    )


LINEAS = register(
    Method(
        name="lineas",
        description="maps of all modules trained jointly through the model (end-to-end W2 loss, "
        "sparse group lasso)",
        fit_omega_beta=_not_per_module,
        default_support="all",
        default_pooling="mean",
        trained=True,
    )
)
