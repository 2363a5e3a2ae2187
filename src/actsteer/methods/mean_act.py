"""Mean-AcT: shift every unit by the difference of target and source means."""

from actsteer.methods.registry import Method, register

MEAN_ACT = register(
    Method(
        name="mean-act",
        description="per-unit shift by the mean difference (ω = 1)",
        fit_omega_beta="actsteer.maps:fit_mean",
    )
)
