"""The Steering value object: the fitted maps of named modules and what describes them.

A Steering is applied with hooks (`applied`, `attach`), composed with others (`steered`),
folded into weights (`fold`), inverted (`inverse`), narrowed to some modules (`select`) and
saved as one file (`save`, `load`); read from a llama.cpp control vector with `from_gguf`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from actsteer.artifact import read_steering, write_steering
from actsteer.choices import GUIDANCE_MODES, check_choice
from actsteer.compat import check_compatible, model_fingerprint
from actsteer.deprecation import warn_renamed
from actsteer.errors import ActSteerError
from actsteer.fold import FOLDED, check_foldable, fold_maps, folded_records
from actsteer.gates import DEFAULT_C, GATE_FIELDS, Gate, GateSettings, describe_fit, fit_gates
from actsteer.hooks import SteeringHandle, Strength
from actsteer.hub import PREFIX, locate, save_folder
from actsteer.maps import UnitMap
from actsteer.methods import METHODS, get_method
from actsteer.tree import model_name, module_tree


def _listed(names: Sequence[str]) -> str:
    """The first few names, and how many there are."""
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f", … ({len(names)} in all)" if len(names) > 3 else "")


def renamed_cfg(guidance: str, cfg: str | None) -> str:
    """`guidance`, or the value of its deprecated old name `cfg` (with a warning)."""
    if cfg is None:
        return guidance
    check_choice(cfg, GUIDANCE_MODES, "cfg (now called guidance=)")
    warn_renamed("the cfg= argument", "called guidance=", stacklevel=4)
    return cfg


@dataclass
class SteeringInfo:
    """The description that travels with a steering's maps (and its artifact).

    support: the support it applies with unless told otherwise (None: the method's default).
    model_name, fingerprint: the model it was fitted on, and every parameter's name and shape.
    data: a free description of the prompt sets (files, counts).
    denoising: for a pipeline, the settings its samples were recorded under.
    calibration: how default_strength was chosen, when `actsteer.calibrate` chose it (the
      cost, budget and curve of (λ, cost)).
    support_pooling: the pooling the support's bounds were estimated with, where it is not
      `pooling` (fit's support_pooling).
    gate: a gated steering's gate settings (kind, threshold, temperature) and how its gates
      were fitted (actsteer.gates); None without gates.
    """

    method: str = "linear-act"
    mode: str = "independent"
    pooling: str | None = None
    support: str | None = None
    max_length: int | None = None
    default_strength: float = 1.0
    model_name: str = ""
    fingerprint: list[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    denoising: dict[str, Any] | None = None
    inverted: bool = False
    calibration: dict[str, Any] | None = None
    support_pooling: str | None = None
    gate: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The artifact's JSON header entries (the model as {"name", "fingerprint"})."""
        entries = dataclasses.asdict(self)
        model = {"name": entries.pop("model_name"), "fingerprint": entries.pop("fingerprint")}
        return {**{k: v for k, v in entries.items() if v is not None}, "model": model}

    @classmethod
    def from_json(cls, entries: dict[str, Any]) -> SteeringInfo:
        """Read the header entries `to_json` writes; entries this version does not know are
        dropped."""
        entries = dict(entries)
        model = entries.pop("model", None) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: v for k, v in entries.items() if k in known},
            model_name=model.get("name") or "",
            fingerprint=model.get("fingerprint"),
        )


@dataclass
class Steering:
    """Per-module affine maps plus their description, and per-module gates where the steering
    is gated (actsteer.gates: the strength of each token is λ times its gate).

    max_strength (not saved) raises the method's upper λ bound: see `extrapolated`. A saved
    default strength past that bound (a calibration extrapolated on purpose) is accepted too.

    Which λ? `actsteer.calibrate(steering, model, tok, budget=1.0)` finds the largest within a
    quality budget and returns a copy with it as default strength. It is a function rather than
    a method because it needs the evaluation code, which sits above this module (a method
    would be an import circle).
    """

    maps: dict[str, UnitMap]
    info: SteeringInfo = field(default_factory=SteeringInfo)
    max_strength: float | None = None
    gates: dict[str, Gate] = field(default_factory=dict)

    def __repr__(self) -> str:
        """One line: method, model, module count and widths, λ range, support (no tensors)."""
        span = get_method(self.method).strength_range if self.method in METHODS else None
        top = self.max_strength if self.max_strength is not None else (span or (0, None))[1]
        lam = "any λ" if span is None else f"λ in [{span[0]:g}, {top:g}]"
        widths = "/".join(str(d) for d in sorted({m.dim for m in self.maps.values()}))
        return (
            f"Steering({self.method}{' (inverted)' if self.info.inverted else ''}, model "
            f"{self.info.model_name or '?'!r}, {len(self.maps)} modules of {widths} units, {lam}, "
            f"support {self.default_support}, default λ {self.info.default_strength:g})"
        )

    @property
    def method(self) -> str:
        return self.info.method

    @property
    def modules(self) -> list[str]:
        return list(self.maps)

    @property
    def gate_settings(self) -> GateSettings | None:
        """How the gates turn scores into strengths; None for an ungated steering."""
        if not self.gates or self.info.gate is None:
            return None
        known = {k: v for k, v in self.info.gate.items() if k in GATE_FIELDS}
        return GateSettings(**known)

    @property
    def default_support(self) -> str:
        return self.info.support or get_method(self.method).default_support

    @property
    def extrapolated_to(self) -> float | None:
        """How far λ may go past the method's range: what `extrapolated` allowed, or the
        default strength where a calibration chose one past it (None: the range alone)."""
        span = get_method(self.method).strength_range if self.method in METHODS else None
        default = self.info.default_strength
        past = default if span is not None and default > span[1] else None
        return max((u for u in (self.max_strength, past) if u is not None), default=None)

    def check_strength(self, strength: Strength | Sequence[float]) -> None:
        """Raise a clear error for a λ outside the method's range (raised by `extrapolated_to`)."""
        get_method(self.method).check_strength(strength, self.extrapolated_to)

    def check_compatible(self, model: nn.Module) -> None:
        """Refuse a model other than the one this steering was fitted on (first mismatch), and
        a model this steering is already folded into."""
        folded = folded_records(model)
        digest = self.digest() if folded else None
        for record in folded:
            if record.get("digest") == digest:
                raise ActSteerError(
                    f"this steering is already folded into this model's weights (at λ = "
                    f"{record.get('strength')}, as its config's {FOLDED!r} records): the model "
                    "is steered without hooks, and applying or folding the steering again "
                    "would apply it twice; use the model as it is, or steer the original "
                    f"model {record.get('model') or ''!r}"
                )
        try:
            check_compatible(self.maps, model, self.info.model_name, self.info.fingerprint)
        except ActSteerError as err:
            if not folded:
                raise
            raise ActSteerError(
                f"{err}. This model is a folded export (its config records "
                f"{len(folded)} steering(s) folded in, e.g. {folded[0].get('method')!r} at "
                f"λ = {folded[0].get('strength')}): folding added biases its original lacks, so "
                "steerings fitted on the original do not fit it; apply them to the original "
                "model, or fit on the folded one"
            ) from None

    def digest(self) -> str:
        """A short hash of the method and maps, and of the gates and their settings where there
        are some: equal digests, the same steering."""
        digest = hashlib.sha256(str(self.method).encode())
        for name in sorted(self.maps):
            amap = self.maps[name]
            digest.update(name.encode())
            for tensor in amap.tensors().values():
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
        settings = self.gate_settings
        if settings is not None:
            digest.update(repr(settings).encode())
            for name in sorted(self.gates):
                gate = self.gates[name]
                digest.update(name.encode())
                digest.update(gate.weight.detach().float().cpu().numpy().tobytes())
                digest.update(gate.bias.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def extrapolated(self, upper: float) -> Steering:
        """The same steering, accepting λ up to `upper` beyond its method's range.

        AcT's λ interpolates between the untouched model (0) and the full transport (1);
        λ > 1 pushes past the target distribution, which the estimate says nothing about.
        Useful to chart where an induction saturates; not saved with the artifact.
        """
        if not math.isfinite(upper) or upper <= 0:
            raise ActSteerError(f"extrapolate to a finite λ > 0, got {upper}")
        return replace(self, max_strength=upper)

    def attach(
        self,
        model: nn.Module,
        strength: Strength = 1.0,
        support: str | None = None,
        positions: str = "all",
        guidance: str = "conditional",
        cfg: str | None = None,
        gated: bool = True,
    ) -> SteeringHandle:
        """Register the hooks; the handle sets the strength and removes them."""
        support = support or self.default_support
        guidance = renamed_cfg(guidance, cfg)
        return SteeringHandle(self, model, strength, support, positions, guidance, gated)

    @contextmanager
    def applied(
        self,
        model: nn.Module,
        strength: Strength = 1.0,
        support: str | None = None,
        positions: str = "all",
        guidance: str = "conditional",
        cfg: str | None = None,
        gated: bool = True,
    ) -> Iterator[SteeringHandle]:
        """Steer `model` inside the block; hooks are removed on exit, even on error.

        strength: λ as a number, or a (batch,) tensor giving each batch row its own λ.
        support: "q0-100" (default for mitigation), "q1-99", "q5-95" or "all" (induction).
        positions: "all" tokens, only the "prompt", only "generated" tokens (these two rely on
          generate's KV cache to tell the passes apart), or the "last" token of each pass.
        guidance: for diffusers pipelines under classifier-free guidance, steer only the
          "conditional" half (default; guidance then amplifies the transport) or "both" halves.
        cfg: the old name of `guidance`, deprecated.
        gated: apply the steering's gates, where it has some (False: the ungated steering).
        """
        handle = self.attach(model, strength, support, positions, guidance, cfg, gated)
        try:
            yield handle
        finally:
            handle.remove()

    def inverse(self) -> Steering:
        """The inverse maps: a steering that removes a concept becomes one that adds it
        (without gates: a gate detects the concept the steering removes).

        Applied after the steering at λ = 1 with support "all", it undoes it exactly. Under a
        bounded support (q0-100, mitigation's default) it does not: the steering leaves the
        activations outside its support alone, and those of them that lie inside the image of
        the support (the inverse's support) are moved by the inverse; a map that is the
        identity outside an interval has no inverse. At λ < 1 neither: the inverse's
        interpolation is not the inverse of the steering's."""
        info = replace(self.info, inverted=not self.info.inverted, calibration=None, gate=None)
        return Steering({name: m.inverse() for name, m in self.maps.items()}, info)

    def with_gate(
        self,
        model: Any,
        tokenizer: Any,
        source: Sequence[str],
        target: Sequence[str],
        kind: str = "context",
        *,
        threshold: float = 0.0,
        temperature: float | None = None,
        c: float = DEFAULT_C,
        max_length: int | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> Steering:
        """The same maps with a gate per module, fitted on the token activations of `source`
        (open) and `target` (shut) texts (actsteer.gates; kind "token", "context" or
        "prompt"). A calibrated default strength is dropped: calibrate the gated steering."""
        settings = GateSettings(kind, threshold, temperature)
        self.check_compatible(module_tree(model))
        gates = fit_gates(
            model, tokenizer, source, target, self.modules, c=c,
            max_length=max_length or self.info.max_length or 128, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
        described = {**settings.to_json(), "fit": describe_fit(len(source), len(target), c)}
        info = replace(self.info, gate=described, calibration=None)
        return replace(self, info=info, gates=gates)

    def with_gate_settings(self, **changes: Any) -> Steering:
        """The same gates with other settings (kind, threshold, temperature)."""
        settings = self.gate_settings
        if settings is None:
            raise ActSteerError("this steering has no gate; add one with with_gate(...)")
        new = replace(settings, **changes)
        return replace(
            self, info=replace(self.info, gate={**(self.info.gate or {}), **new.to_json()})
        )

    def without_gate(self) -> Steering:
        """The same maps, ungated (every token at λ), e.g. to fold them."""
        return replace(self, gates={}, info=replace(self.info, gate=None))

    def select(self, modules: str | Sequence[str]) -> Steering:
        """The same steering on some of its modules only, without refitting: `modules` is a
        regular expression matched against whole module names, or a list of names.

        Each kept map (and gate) is unchanged, so a sequential fit's later maps still assume
        the earlier ones; a calibration's record is dropped (it measured all modules; the
        default λ stays: recalibrate the selection to know its cost)."""
        if isinstance(modules, str):
            try:
                pattern = re.compile(modules)
            except re.error as err:
                raise ActSteerError(
                    f"modules {modules!r} is not a regular expression: {err}"
                ) from None
            chosen = [name for name in self.maps if pattern.fullmatch(name)]
        else:
            unknown = [name for name in modules if name not in self.maps]
            if unknown:
                raise ActSteerError(
                    f"this steering has no module {unknown[0]!r}; its modules are "
                    f"{_listed(self.modules)}"
                )
            chosen = [name for name in self.maps if name in set(modules)]
        if not chosen:
            raise ActSteerError(
                f"modules {modules!r} match none of this steering's modules "
                f"({_listed(self.modules)}); a pattern matches whole names, e.g. "
                f"'{re.escape(self.modules[0])}'"
            )
        return replace(
            self,
            maps={name: self.maps[name] for name in chosen},
            gates={name: gate for name, gate in self.gates.items() if name in chosen},
            info=replace(self.info, calibration=None),
        )

    def fold(self, model: Any, strength: float = 1.0, support: str | None = None) -> Any:
        """Edit the weights of `model` (a causal LM or a diffusers pipeline) in place so it
        computes the steered model with no hooks; returns it.

        Only the unbounded support "all" is affine and folds exactly: pass support="all" when
        the steering's default support is bounded.
        """
        support = support or self.default_support
        for amap in self.maps.values():
            check_foldable(amap)
        if self.gates:
            raise ActSteerError(
                "a gated steering cannot be folded into weights: its gate sets each token's "
                "strength from the token's activations, which no weight can; fold "
                "steering.without_gate() (every token at λ) or keep the steering as hooks"
            )
        if support != "all":
            raise ActSteerError(
                f"support {support!r} only transports activations inside per-unit bounds, which "
                "is not affine and cannot be folded into weights exactly; fold with "
                "support='all' (every activation is transported) or keep the steering as hooks"
            )
        if not isinstance(strength, int | float):
            raise ActSteerError("folding takes one number as strength, not a per-row tensor")
        self.check_strength(strength)
        self.check_compatible(module_tree(model))
        record = {
            "digest": self.digest(),
            "method": self.method,
            "strength": strength,
            "model": self.info.model_name,
        }
        fold_maps(
            self.maps,
            model,
            strength,
            lambda: self.applied(model, strength, "all", guidance="both"),
            record,
        )
        return model

    def save(self, path: str | Path) -> Path:
        """Write the steering to one .safetensors file (tensors + JSON metadata); an existing
        file is replaced in one step (the CLI refuses one unless --force)."""
        return write_steering(self.maps, self.info.to_json(), path, self.gates)

    @classmethod
    def load(cls, path: str | Path) -> Steering:
        """Read a steering saved with `save`: a file, a folder from `save_pretrained`, or a hub
        id `hf:USER/REPO[@REVISION]` (actsteer.hub); a damaged or foreign file is a clear
        error."""
        maps, gates, entries = read_steering(locate(path))
        return cls(maps, SteeringInfo.from_json(entries), gates=gates)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the steering as a folder to share: the artifact (steering.safetensors) and a
        model card (README.md with YAML front matter: method, base model, modules, data, default
        λ and its calibration curve, library version). Publish it with
        `huggingface-cli upload USER/REPO FOLDER`."""
        return save_folder(self, folder)

    @classmethod
    def from_pretrained(
        cls, repo_id_or_folder: str | Path, revision: str | None = None
    ) -> Steering:
        """Read a shared steering: a folder written by `save_pretrained`, or a hub repository
        `USER/REPO` (downloaded through huggingface_hub and cached; `revision` a branch, tag or
        commit)."""
        spec = str(repo_id_or_folder)
        if not Path(spec).exists() and not spec.startswith(PREFIX):
            spec = f"{PREFIX}{spec}" + (f"@{revision}" if revision else "")
        elif revision is not None:
            raise ActSteerError(f"revision= applies to hub repositories, not to {spec!r}")
        return cls.load(spec)

    @classmethod
    def from_gguf(cls, path: str | Path, model: nn.Module) -> Steering:
        """Read a llama.cpp control vector (from `actsteer export --format gguf`, repeng or
        llama.cpp's cvector-generator) for `model`: ω = 1 and β = tensor direction.N at the
        output of decoder block N. Its strength is llama.cpp's scale: λ = 1 is the file as
        written, any λ is allowed (the method is actadd's)."""
        from actsteer.gguf_vectors import read_control_vector

        tree = module_tree(model)
        maps, data = read_control_vector(path, tree)
        info = SteeringInfo(
            method="actadd",
            support="all",
            model_name=model_name(tree),
            fingerprint=model_fingerprint(tree),
            data=data,
        )
        return cls(maps, info)


@contextmanager
def steered(
    model: nn.Module,
    *steerings: tuple[Steering, Strength],
    support: str | None = None,
    positions: str = "all",
    guidance: str = "conditional",
    cfg: str | None = None,
) -> Iterator[list[SteeringHandle]]:
    """Apply several steerings at once, each with its own strength: `steered(m, (a, 1), (b, .5))`.

    Where two steer the same module they compose in the given order: b's map acts on the output
    of a's (and b's support is tested on those transported values).
    """
    guidance = renamed_cfg(guidance, cfg)
    with ExitStack() as stack:
        yield [
            stack.enter_context(steering.applied(model, strength, support, positions, guidance))
            for steering, strength in steerings
        ]
