"""actsteer: steer language and diffusion models by transporting activations (AcT).

model, tok = actsteer.load_model("smollm2-135m")
steering = actsteer.fit(model, tok, source=..., target=..., modules="post-attn-ln")
with steering.applied(model, strength=0.5):
    model.generate(...)
"""

__version__ = "0.1.0"

from actsteer.diffusion import load_pipeline  # noqa: E402
from actsteer.errors import ActSteerError  # noqa: E402
from actsteer.fit import fit  # noqa: E402
from actsteer.models import load_model  # noqa: E402
from actsteer.steer import Steering, steered  # noqa: E402

__all__ = [
    "ActSteerError",
    "Steering",
    "__version__",
    "fit",
    "load_model",
    "load_pipeline",
    "steered",
]
