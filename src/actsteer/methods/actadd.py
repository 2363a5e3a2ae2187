"""ActAdd (Turner et al., 2023): add the activation difference of contrasting prompts.

As a map: ω = 1, β = mean(target) − mean(source), where each sample is one prompt of a pair
(pooled at the last token by default). With a single pair this is exactly h(p+) − h(p−);
with several pairs, their average. The strength is the coefficient c, unbounded.
"""

from actsteer.methods.mean_act import fit_mean
from actsteer.methods.registry import Method, register

ACTADD = register(
    Method(
        name="actadd",
        description="add c·(h(p+) − h(p−)), the activation difference of prompt pairs (ω = 1)",
        fit_omega_beta=fit_mean,
        strength_range=None,
        default_support="all",
        default_pooling="last",
        min_samples=1,
        reliable_texts=0,
    )
)
