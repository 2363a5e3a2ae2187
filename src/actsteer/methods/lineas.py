"""LinEAS: the AcT maps of every chosen module trained jointly, end to end (actsteer.lineas).

A method like the others (`actsteer methods`, λ, supports and the artifact know it); it is
fitted in mode end-to-end, where `fit` hands the whole fit to its trainer.
"""

from actsteer.methods.registry import Method, register

LINEAS = register(
    Method(
        name="lineas",
        description="maps of all modules trained jointly through the model (end-to-end W2 loss, "
        "sparse group lasso)",
        train="actsteer.lineas:fit_end_to_end",
        default_support="all",
        default_pooling="mean",
    )
)
