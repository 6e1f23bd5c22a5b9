"""The one place that writes and reads checkpoints and exported backbones.

Design: docs/architecture.md#checkpoints-and-exported-backbones.

Writes are atomic (temp file in the same folder, fsync, rename), so a crash never leaves a
half-written ``checkpoint.pth``. Every read uses ``torch.load(weights_only=True)``: a
checkpoint is data, and loading one never runs code from it. The only non-tensor class
allowed is ``argparse.Namespace``, which official DINO checkpoints store as ``args``.
Exported backbones (``.safetensors`` with metadata, see :func:`export_backbone`) are read
here too. A file that cannot be read (empty, truncated, random bytes, a folder, a pickled
class) raises :class:`CheckpointError` with one line naming it and what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from dino_locat.errors import InputError
from dino_locat.files import atomic_write
from dino_locat.models import POS_EMBED_INTERPOLATIONS, build_backbone, canonical_arch
from dino_locat.models.compile import COMPILE_PREFIX
from dino_locat.models.vision_transformer import (
    EXPORT_FORMAT,
    backbone_metadata,
    metadata_config,
)


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


# What to do about a file that cannot be read, by who asked for it.
READ_HINT = (
    "pass a file written by torch.save (a training checkpoint.pth, an official DINO "
    "checkpoint, a backbone state_dict) or a .safetensors from eval/export.py"
)
RESUME_HINT = "move it aside or choose another --output_dir (nothing was overwritten)"
_ZIP_MAGIC = b"PK\x03\x04"


def plain_args(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """``args`` as a dict of plain values (str/int/float/bool/None/lists/dicts).

    Stored this way, a checkpoint loads with ``weights_only=True`` and no allowlist.
    """
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return str(value)

    return {str(k): plain(v) for k, v in items.items()}


def _write_durably(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Atomic write, then fsync of the folder entry so the rename survives a power cut."""
    path = atomic_write(path, write)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically; the previous file stays intact until rename."""
    return _write_durably(path, lambda handle: torch.save(dict(state), handle))


def _is_safetensors(path: Path, head: bytes, size: int) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    return len(head) > 8 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") < size


def _short(err: BaseException) -> str:
    """An exception's first sentence, without terminal colour codes, at most 160 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    line = text.splitlines()[0].split(". ")[0].strip() if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _unreadable(path: Path, err: BaseException, zipped: bool, hint: str) -> CheckpointError:
    """One line saying what is wrong with ``path`` (by what torch reported) and what to do."""
    forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if forbidden:
        return CheckpointError(
            f"refused to load {path}: it holds a pickled {forbidden.group(1)}, not only "
            f"tensors and plain data, and unpickling it could run code; {hint}"
        )
    if zipped:
        problem = f"a damaged or truncated zip archive ({_short(err)})"
    else:
        problem = "neither a torch checkpoint (zip or pickle) nor a safetensors file"
    return CheckpointError(f"cannot read checkpoint {path}: {problem}; {hint}")


def _load_safetensors(path: Path, map_location: str | torch.device, hint: str) -> dict[str, Any]:
    """An exported backbone, shaped like the checkpoint it came from: its tensors under
    ``state_dict``, its metadata as ``args`` (arch, patch size, image size, rule) and the
    source's ``epoch``, so that every reader treats both alike."""
    try:
        with safe_open(path, framework="pt", device=str(map_location)) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as err:  # the Rust reader's errors have no common Python base
        raise CheckpointError(
            f"cannot read checkpoint {path}: a damaged .safetensors file ({_short(err)}); {hint}"
        ) from err
    ckpt: dict[str, Any] = {"state_dict": tensors, "export": dict(metadata)}
    if metadata.get("format") == EXPORT_FORMAT:
        try:
            arch, config = metadata_config(metadata, str(path))
        except ValueError as err:
            raise CheckpointError(f"{err}; {hint}") from err
        ckpt["args"] = {
            "arch": arch,
            "patch_size": config["patch_size"],
            "image_size": config["img_size"],
            "pos_embed_interpolation": config["pos_embed_interpolation"],
        }
        if metadata.get("source_epoch", "").isdigit():
            ckpt["epoch"] = int(metadata["source_epoch"])
    return ckpt


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    hint: str = READ_HINT,
    mmap: bool = False,
) -> Any:
    """Read a checkpoint safely (``weights_only=True``) or an exported ``.safetensors``.

    Anything unreadable raises :class:`CheckpointError`: one line naming the file, what is
    wrong with it and ``hint`` (what to do). ``mmap=True`` maps the tensors of a zip
    checkpoint instead of reading them: a cheap check that the file is whole and safe.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {_short(err)}; {hint}") from err
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty; {hint}")
    if _is_safetensors(path, head, size):
        return _load_safetensors(path, map_location, hint)
    zipped = head.startswith(_ZIP_MAGIC)
    try:
        with warnings.catch_warnings():
            # random bytes can look like an unknown pickle protocol: our error says enough
            warnings.filterwarnings("ignore", module=r"torch\._weights_only_unpickler")
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(
                    path, map_location=map_location, weights_only=True, mmap=mmap and zipped
                )
    except MemoryError:
        raise
    except Exception as err:  # torch's unpicklers raise anything on bad bytes (KeyError: 101)
        raise _unreadable(path, err, zipped, hint) from err


def checkpoint_args(ckpt: Any) -> dict[str, Any]:
    """The training args stored in a checkpoint (ours: dict; official DINO: Namespace)."""
    if not isinstance(ckpt, Mapping):
        return {}
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return plain_args(args)
    if isinstance(args, Mapping):
        return dict(args)
    return {}


def trained_with_dino_code(ckpt: Any) -> bool:
    """True for checkpoints written by DINO's own main_dino.py: it pickles its argparse
    Namespace as ``args`` (ours store a plain dict), with DINO's ``arch`` among them."""
    return (
        isinstance(ckpt, Mapping)
        and isinstance(ckpt.get("args"), argparse.Namespace)
        and hasattr(ckpt["args"], "arch")
    )


def pos_embed_rule(ckpt: Any, requested: str = "auto") -> str:
    """The position-embedding resampling to evaluate ``ckpt`` with: the rule it recorded
    (training's ``--pos_embed_interpolation``, an export's metadata), else DINO's rule for
    what DINO's code trained (its published numbers were measured that way), else timm's;
    ``requested`` (``timm``/``dino``) forces one."""
    if requested != "auto":
        return requested
    recorded = checkpoint_args(ckpt).get("pos_embed_interpolation")
    if recorded in POS_EMBED_INTERPOLATIONS:
        return recorded
    return "dino" if trained_with_dino_code(ckpt) else "timm"


def extract_backbone_state(
    ckpt: Any, checkpoint_key: str = "teacher", source: str = "the checkpoint"
) -> dict[str, Tensor]:
    """Backbone weights from any supported checkpoint layout.

    Accepted: our training checkpoints and official DINO ones (``teacher``/``student``
    holding ``module.``/``backbone.``-prefixed keys), a bare backbone state_dict, and timm
    state_dicts (the classifier ``head.`` is dropped); ``_orig_mod.`` (torch.compile
    wrappers) is dropped wherever it appears.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(ckpt).__name__}, not a dict of weights; {READ_HINT}"
        )
    state = ckpt
    if checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], Mapping):
        state = ckpt[checkpoint_key]
    elif any(k in ckpt for k in ("teacher", "student")):
        present = [k for k in ("teacher", "student") if k in ckpt]
        raise CheckpointError(
            f"--checkpoint_key {checkpoint_key!r} is not in {source} (it has {present})"
        )
    elif "state_dict" in ckpt or "model" in ckpt:
        state = ckpt.get("state_dict", ckpt.get("model"))
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        key = key.replace(COMPILE_PREFIX, "")
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith("head.") or key.startswith("fc_norm."):
            continue
        out[key] = value
    if not out:
        raise CheckpointError(f"{source} holds no backbone weights (no tensors); {READ_HINT}")
    return out


def load_backbone_state(model: nn.Module, state: Mapping[str, Tensor], source: str = "") -> None:
    """Strict load with a readable report of missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith("head."))
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit the model:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"  {title} keys ({len(keys)}): {shown}")
        if any(".attn.gaug." in k for k in missing):
            lines.append("  (the model has GAug but the checkpoint does not: use a vit_* arch?)")
        if any(".attn.gaug." in k for k in unexpected):
            lines.append("  (the checkpoint has GAug: use a locatvit_* arch)")
        raise CheckpointError("\n".join(lines))
    head_keys = {k: v for k, v in own.items() if k.startswith("head.")}
    model.load_state_dict({**head_keys, **state}, strict=True)


_SIZE_BY_DIM = {192: "t", 384: "s", 768: "b"}
_IMAGE_SIZE_ARGS = ("global_crop_size", "global_crops_size", "image_size", "img_size")


def _weights_config(state: Mapping[str, Tensor], source: str) -> dict[str, Any]:
    """Architecture facts read off the weights themselves (they never lie about shapes)."""
    try:
        proj = state["patch_embed.proj.weight"]
        pos = state["pos_embed"]
    except KeyError as err:
        raise CheckpointError(
            f"{source} holds no ViT backbone (no patch_embed.proj.weight / pos_embed among "
            f"its tensors); {READ_HINT}"
        ) from err
    embed_dim, patch_size = proj.shape[0], proj.shape[-1]
    if embed_dim not in _SIZE_BY_DIM:
        raise CheckpointError(
            f"{source}: embed dim {embed_dim} matches no known arch (192/384/768 = t/s/b)"
        )
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise CheckpointError(f"{source}: pos_embed holds {pos.shape[1] - 1} patches, not a square")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    locality = any(".attn.gaug." in k for k in state)
    size = _SIZE_BY_DIM[embed_dim]
    return {
        "arch": f"{'locatvit' if locality else 'vit'}_{size}",
        "patch_size": int(patch_size),
        "embed_dim": int(embed_dim),
        "native_image_size": int(side * patch_size),
        "depth": depth,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
    }


def _agree(name: str, flag: Any, stored: Any, weights: Any, source: str) -> None:
    """Raise when the --flag, the checkpoint's args and the weights disagree on ``name``."""
    if stored is not None and weights is not None and stored != weights:
        raise CheckpointError(
            f"{source}: its args say {name}={stored} but its weights are {name}={weights}"
        )
    if flag is None:
        return
    if stored is not None and flag != stored:
        raise CheckpointError(
            f"--{name} {flag} contradicts the checkpoint {source}, trained with "
            f"{name}={stored}; drop --{name} (it is read from the checkpoint) or pass {stored}"
        )
    if weights is not None and flag != weights:
        raise CheckpointError(
            f"--{name} {flag} does not fit the weights in {source}, which are {name}={weights}"
        )


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path``, or the ``checkpoint.pth`` inside it when it is a training ``--output_dir``."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "checkpoint.pth").exists():
        raise CheckpointError(
            f"{path} is a folder without checkpoint.pth; pass a checkpoint file or a "
            "training --output_dir"
        )
    return path / "checkpoint.pth"


def load_pretrained_backbone(
    path: str | os.PathLike,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
    image_size: int | None = None,
    pos_embed_interpolation: str = "auto",
) -> tuple[nn.Module, dict[str, Any]]:
    """The one checkpoint-to-backbone loader used by every evaluator.

    Accepts our training checkpoints (a file, or the ``output_dir`` holding
    ``checkpoint.pth``), official DINO checkpoints, bare backbone and timm LocAtViT
    state_dicts. Arch, patch size and depth come from the checkpoint (its args and its
    weights); ``arch``/``patch_size`` given by the user must agree with them, so that a
    wrong flag fails loudly instead of loading into a different model. ``image_size`` is
    the evaluation resolution: the flag, else the training crop size in the args, else the
    model's native size. ``pos_embed_interpolation`` (auto/timm/dino): see
    :func:`pos_embed_rule`. Returns the frozen model in eval mode and a dict describing it.
    """
    path = checkpoint_file(path)
    source = str(path)
    ckpt = load_checkpoint(path)
    args = checkpoint_args(ckpt)
    state = extract_backbone_state(ckpt, checkpoint_key, source)
    found = _weights_config(state, source)

    def canonical(name: str, what: str) -> str:
        try:
            return canonical_arch(name)
        except ValueError as err:
            raise CheckpointError(f"{what}: {err}") from err

    stored_arch = canonical(args["arch"], f"{source} args") if args.get("arch") else None
    flag_arch = canonical(arch, "--arch") if arch else None
    _agree("arch", flag_arch, stored_arch, found["arch"], source)
    stored_patch = args.get("patch_size")
    _agree("patch_size", patch_size, stored_patch, found["patch_size"], source)

    stored_size = next((args[k] for k in _IMAGE_SIZE_ARGS if isinstance(args.get(k), int)), None)
    eval_size = int(image_size or stored_size or found["native_image_size"])
    if eval_size % found["patch_size"]:
        raise CheckpointError(
            f"--image_size {eval_size} is not a multiple of the patch size {found['patch_size']}"
        )
    model = build_backbone(
        found["arch"],
        img_size=found["native_image_size"],
        patch_size=found["patch_size"],
        depth=found["depth"],
        mlp_ratio=found["mlp_ratio"],
        qkv_bias=found["qkv_bias"],
        pos_embed_interpolation=pos_embed_rule(ckpt, pos_embed_interpolation),
    )
    load_backbone_state(model, state, source)
    model.eval().requires_grad_(False)
    info = {
        **found,
        "image_size": eval_size,
        "pos_embed_interpolation": model.pos_embed_interpolation,
        "checkpoint": source,
        "checkpoint_key": checkpoint_key if checkpoint_key in ckpt else None,
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
    }
    return model, info


EXPORT_SUFFIXES = (".safetensors", ".pth")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_backbone(
    source: str | os.PathLike,
    output: str | os.PathLike,
    checkpoint_key: str = "teacher",
    pos_embed_interpolation: str = "auto",
) -> dict[str, Any]:
    """Write the backbone of ``source`` (any file :func:`load_pretrained_backbone` reads)
    to ``output`` for use outside this project; returns what was written.

    ``.safetensors``: the state_dict with our (= timm LocAtViT's) key names and string
    metadata (:func:`~dino_locat.models.vision_transformer.backbone_metadata`, plus the
    source's file name, sha256, epoch and network), which timm reads through
    ``pretrained_cfg_overlay=dict(file=...)``. ``.pth``: DINO's backbone-only format, the
    plain state_dict that DINO's evaluation scripts load. The weights are loaded strictly
    into our model first, so an export always rebuilds the network that was evaluated.
    """
    output = Path(output)
    if output.suffix not in EXPORT_SUFFIXES:
        raise CheckpointError(
            f"--output {output}: name it .safetensors (timm, with metadata) or .pth "
            "(DINO's backbone-only state_dict)"
        )
    model, info = load_pretrained_backbone(
        source, checkpoint_key=checkpoint_key, pos_embed_interpolation=pos_embed_interpolation
    )
    checkpoint = Path(info["checkpoint"])
    if output.exists() and output.resolve() == checkpoint.resolve():
        raise CheckpointError(f"--output {output} is the checkpoint itself; choose another name")
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    metadata = backbone_metadata(model)
    if output.suffix == ".safetensors":
        metadata.update(source_file=checkpoint.name, source_sha256=file_sha256(checkpoint))
        if info["epoch"] is not None:
            metadata["source_epoch"] = str(info["epoch"])
        if info["checkpoint_key"] is not None:
            metadata["checkpoint_key"] = info["checkpoint_key"]
        data = safetensors.torch.save(state, metadata=metadata)
        _write_durably(output, lambda handle: handle.write(data))
    else:
        save_checkpoint(state, output)
    return {"output": str(output), "tensors": len(state), "metadata": metadata, **info}
