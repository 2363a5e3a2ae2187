"""Sharing steerings the Hugging Face way: a folder holding the artifact and a model card
(README.md with YAML front matter), published with `huggingface-cli upload`, and hub ids
(`hf:USER/REPO[@REVISION]`) wherever a steering file is taken, resolved through
huggingface_hub's download and cache (so HF_HUB_OFFLINE, HF_HOME and tokens work as usual).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from actsteer.errors import ActSteerError
from actsteer.outputs import written_file
from actsteer.version import __version__


class Steering(Protocol):
    """What sharing reads of an actsteer.steering.Steering (which imports this module)."""

    info: Any

    @property
    def maps(self) -> Mapping[str, Any]: ...

    @property
    def modules(self) -> list[str]: ...

    @property
    def default_support(self) -> str: ...

    def save(self, path: str | Path) -> Path: ...


#: The artifact's file name inside a shared folder or hub repository.
ARTIFACT = "steering.safetensors"
CARD = "README.md"
PREFIX = "hf:"
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def locate(spec: str | Path) -> Path:
    """The steering file that `spec` names: `hf:USER/REPO[@REVISION]` (downloaded into, or
    read from, the Hugging Face cache), a folder written by `save_pretrained`, or a file."""
    text = str(spec)
    if text.startswith(PREFIX):
        return download(text[len(PREFIX) :])
    path = Path(spec)
    if path.is_dir():
        if not (path / ARTIFACT).is_file():
            raise ActSteerError(
                f"folder {text!r} holds no {ARTIFACT}; a shared steering folder is written by "
                "Steering.save_pretrained (or pass the steering's .safetensors file)"
            )
        return path / ARTIFACT
    return path


def download(repo: str) -> Path:
    """The artifact of hub repository `USER/REPO[@REVISION]`, through huggingface_hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = repo.partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise ActSteerError(
            f"{PREFIX}{repo} is not a hub repository id; write hf:USER/REPO or "
            "hf:USER/REPO@REVISION"
        )
    try:
        return Path(hf_hub_download(repo_id, ARTIFACT, revision=revision or None))
    except LocalEntryNotFoundError:
        raise ActSteerError(
            f"steering {PREFIX}{repo} is not in the local Hugging Face cache and the hub cannot "
            "be reached (offline, or HF_HUB_OFFLINE=1); fetch it where the hub is reachable "
            f"(huggingface-cli download {repo_id}) or pass the steering file itself"
        ) from None
    except RevisionNotFoundError:
        raise ActSteerError(f"hub repository {repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise ActSteerError(
            f"hub repository {repo_id} has no {ARTIFACT}: it holds no actsteer steering "
            "(share one with Steering.save_pretrained and huggingface-cli upload)"
        ) from None
    except RepositoryNotFoundError:
        raise ActSteerError(
            f"no hub repository {repo_id} (or it is private: log in with huggingface-cli login)"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise ActSteerError(f"could not download {PREFIX}{repo}: {err}") from None


def save_folder(steering: Steering, folder: str | Path) -> Path:
    """Write the artifact and its model card into `folder` (created if needed), each file
    replaced in one step; returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ActSteerError(f"{str(folder)!r} is a file; save_pretrained writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    steering.save(folder / ARTIFACT)
    with written_file(folder / CARD) as scratch:
        scratch.write_text(model_card(steering), encoding="utf-8")
    return folder


def card_data(steering: Steering) -> dict[str, Any]:
    """The model card's front matter: the hub's fields (library, tags, base model when the
    steering was fitted on a hub model) and actsteer's own."""
    info = steering.info
    data: dict[str, Any] = {
        "library_name": "actsteer",
        "tags": ["actsteer", "activation-steering", "activation-transport", info.method],
    }
    if _REPO_ID.fullmatch(info.model_name) and not Path(info.model_name).exists():
        data["base_model"] = info.model_name
    actsteer: dict[str, Any] = {
        "method": info.method,
        "mode": info.mode,
        "model": info.model_name,
        "modules": steering.modules,
        "pooling": info.pooling,
        "support": steering.default_support,
        "default_strength": info.default_strength,
        "data": info.data,
        "library_version": __version__,
    }
    if info.calibration is not None:
        actsteer["calibration"] = info.calibration
    data["actsteer"] = actsteer
    return data


def model_card(steering: Steering) -> str:
    """README.md of a shared steering: YAML front matter (huggingface_hub's ModelCardData)
    and a short description with how to use it."""
    from huggingface_hub import ModelCardData

    info = steering.info
    front = ModelCardData(**card_data(steering)).to_yaml()
    calibration = info.calibration
    chosen = (
        f"λ = {info.default_strength:g}, chosen by `actsteer calibrate` "
        f"({calibration.get('cost', '?')} budget {calibration.get('budget', '?')})"
        if calibration
        else f"λ = {info.default_strength:g}"
    )
    curve = ""
    if calibration and calibration.get("curve"):
        rows = "\n".join(
            f"| {lam:g} | {'—' if cost is None else f'{cost:.4g}'} |"
            for lam, cost in calibration["curve"]
        )
        curve = f"\n\nCalibration curve (λ and its cost):\n\n| λ | cost |\n|---|---|\n{rows}"
    return f"""---
{front}
---

# actsteer steering: {info.method} on {info.model_name or "?"}

A steering made with [actsteer](https://github.com/actsteer/actsteer): one per-unit affine map
on each of {len(steering.maps)} modules of `{info.model_name or "?"}`, fitted in mode
`{info.mode}` with {info.pooling or "?"} pooling, applied with support
`{steering.default_support}`. Default strength {chosen}.{curve}

Data: {_describe(info.data)}

## Use

```python
import actsteer

steering = actsteer.Steering.from_pretrained("USER/REPO")  # or this folder's path
model, tok = actsteer.load_model("{info.model_name or "MODEL"}")
with steering.applied(model, strength={info.default_strength:g}):
    ...  # model.generate(...)
```

On the command line, pass `--steering hf:USER/REPO` wherever a steering file goes.
"""


def _describe(data: dict[str, Any]) -> str:
    shown = {k: v for k, v in data.items() if k != "training"}
    return ", ".join(f"{k} = {v}" for k, v in shown.items()) or "not described"
