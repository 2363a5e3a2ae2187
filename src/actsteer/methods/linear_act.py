"""Linear-AcT: per-unit 1-D optimal transport (monotone coupling) fitted by least squares."""

from actsteer.methods.registry import Method, register

LINEAR_ACT = register(
    Method(
        name="linear-act",
        description="per-unit affine map fitted on the sorted (optimal transport) coupling",
        fit_omega_beta="actsteer.maps:fit_linear",
    )
)
