"""actsteer: steer language and diffusion models by transporting activations (AcT).

model, tok = actsteer.load_model("smollm2-135m")
steering = actsteer.fit(model, tok, source=..., target=..., modules="post-attn-ln")
with steering.applied(model, strength=0.5):
    model.generate(...)
steering = actsteer.calibrate(steering, model, tok, budget=1.0).steering  # λ: ΔPPL ≤ +1
"""

from actsteer.calibration import CalibrationResult, calibrate
from actsteer.diffusion import load_pipeline
from actsteer.errors import ActSteerError
from actsteer.fit import fit
from actsteer.models import load_model
from actsteer.steering import Steering, SteeringInfo, steered
from actsteer.version import __version__

__all__ = [
    "ActSteerError",
    "CalibrationResult",
    "Steering",
    "SteeringInfo",
    "__version__",
    "calibrate",
    "fit",
    "load_model",
    "load_pipeline",
    "steered",
]
