"""Gaussian-AcT: the optimal transport map between per-unit Gaussians fitted to each set."""

from actsteer.methods.registry import Method, register

GAUSSIAN_ACT = register(
    Method(
        name="gaussian-act",
        description="per-unit Gaussian transport: ω = σ_t/σ_s, β = m_t − ω m_s",
        fit_omega_beta="actsteer.maps:fit_gaussian",
    )
)
