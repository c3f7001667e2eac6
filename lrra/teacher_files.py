"""Reading a teacher file, whatever wrote it, and checking it against the run's input contract.

Formats (``teacher_format``; ``auto`` tells them apart from the file itself):

* ``lrra``: ``{"state_dict", "meta"}`` written by ``python -m lrra teacher`` (or a distilled student);
  its metadata records the architecture and the input contract.
* ``export``: a torch.export archive (``torch.export.save``, usually ``.pt2``).
* ``torchscript``: a TorchScript archive (``torch.jit.save``).
* ``state_dict``: a plain ``state_dict``, or a checkpoint dict holding one under ``state_dict``,
  ``model_state_dict``, ``model`` or ``net``, of the architecture named in ``teacher_arch``
  (``torchvision:NAME``, ``timm:NAME`` or a built-in name).
* ``pickle``: a whole pickled ``nn.Module``. Unpickling runs code named in the file, so it is
  never chosen by ``auto``: a file that needs it is refused with a message saying how to opt in.

Every file but ``lrra`` carries no contract, so it comes from the config: ``image_size``,
``channels``, and ``input_mean``/``input_std`` (else the dataset's normalisation).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrra.config import LRRAConfig
from lrra.config_validation import per_channel
from lrra.data import dataset_info
from lrra.external_models import TappedClassifier, load_exported, load_torchscript
from lrra.models import build_classifier

COMPILED = ("export", "torchscript")      # rebuilt elsewhere from the file's bytes
SAVED = "saved"                           # a torch.save file: lrra, state_dict or pickle, by its content
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")


class TeacherError(ValueError):
    """A teacher file is missing, unreadable, or does not fit the run's config."""


def detect_format(path: Path) -> str:
    """``export``, ``torchscript`` or ``saved`` (a torch.save file), from the file's own structure."""
    if not zipfile.is_zipfile(path):
        return SAVED  # torch.save's legacy (non-zip) serialisation; torch.load decides
    names = zipfile.ZipFile(path).namelist()
    if any(n.endswith("archive_format") or "serialized_exported_program" in n for n in names):
        return "export"
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return SAVED
    raise TeacherError(f"teacher file {path} is a zip archive but not one PyTorch writes; " + _FORMATS_HINT)


_FORMATS_HINT = ("expected a torch.export archive (.pt2), a TorchScript archive, a state_dict (with "
                 "teacher_arch=torchvision:NAME, timm:NAME or a built-in name) or a teacher file of "
                 "`python -m lrra teacher`")


def input_contract(cfg: LRRAConfig, meta: dict[str, Any] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the teacher's inputs are normalised with: its file's, else the config's, else the dataset's."""
    if meta and "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])
    if cfg.input_mean:
        return per_channel(cfg.input_mean), per_channel(cfg.input_std)
    info = dataset_info(cfg.dataset, cfg.data_dir)
    if info.channels == cfg.channels:
        return info.mean, info.std
    return info.mean * cfg.channels, info.std * cfg.channels  # a grey dataset repeated to 3 channels


def read_teacher(data: bytes, fmt: str, cfg: LRRAConfig, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher in ``data`` (the bytes of file ``name``) read as ``fmt``, and its metadata.

    ``fmt`` is a ``teacher_format`` or ``saved``. The model answers ``model(x, return_features=True)``.
    """
    if fmt == "export":
        return _compiled(load_exported, data, name, "a torch.export archive"), _foreign_meta(cfg, fmt)
    if fmt == "torchscript":
        return _compiled(load_torchscript, data, name, "a TorchScript archive"), _foreign_meta(cfg, fmt)
    blob = _load_saved(data, fmt, name)
    if fmt == "pickle":
        if not isinstance(blob, nn.Module):
            raise TeacherError(f"teacher file {name} unpickles to a {type(blob).__name__}, not an nn.Module")
        return TappedClassifier(blob).eval(), _foreign_meta(cfg, fmt)
    if fmt in ("lrra", SAVED) and _is_lrra(blob):
        return _lrra_teacher(blob, cfg, name)
    if fmt == "lrra":
        raise TeacherError(f"teacher file {name} is not an LRRA teacher (expected keys 'state_dict' and 'meta')")
    state = _state_dict_in(blob)
    if state is None:
        raise TeacherError(f"teacher file {name} holds no state_dict of tensors; " + _FORMATS_HINT)
    model = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels)
    target = model.net if isinstance(model, TappedClassifier) else model
    try:
        target.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[:3])
        raise TeacherError(f"teacher file {name}: its weights do not fit teacher_arch={cfg.teacher_arch!r} with "
                           f"num_classes={cfg.num_classes}, channels={cfg.channels} ({detail})") from None
    return model.eval(), _foreign_meta(cfg, "state_dict")


def _compiled(load, data: bytes, name: str, what: str) -> nn.Module:
    try:
        return load(data).eval()
    except Exception as err:  # noqa: BLE001 - a broken archive fails in many ways inside torch
        raise TeacherError(f"teacher file {name} cannot be read as {what} ({first_line(err)})") from None


def _load_saved(data: bytes, fmt: str, name: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # bytes that are no pickle at all
            raise TeacherError(f"teacher file {name} is not a readable PyTorch weights file "
                               f"({first_line(err)}); " + _FORMATS_HINT) from None
        if fmt == "pickle":
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        raise TeacherError(
            f"teacher file {name} holds pickled Python objects (a whole nn.Module?), which are refused: unpickling "
            "runs code named in the file. Save the model's state_dict or torch.export it instead, or, for a file "
            f"you trust, open it with --set teacher_format=pickle ({first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - truncated, not a zip, not a pickle: all mean "not a teacher"
        raise TeacherError(f"teacher file {name} is not a readable PyTorch weights file ({first_line(err)}); "
                           + _FORMATS_HINT) from None


def _is_lrra(blob: Any) -> bool:
    return isinstance(blob, dict) and isinstance(blob.get("meta"), dict) and "state_dict" in blob \
        and "arch" in blob["meta"]


def _lrra_teacher(blob: dict[str, Any], cfg: LRRAConfig, name: str) -> tuple[nn.Module, dict[str, Any]]:
    meta = blob["meta"]
    check_teacher_meta(meta, cfg, name)
    model = build_classifier(meta["arch"], meta["num_classes"], meta["channels"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        raise TeacherError(f"teacher file {name}: weights do not fit architecture {meta['arch']!r}: {err}") from None
    return model.eval(), {"format": "lrra", **meta}


def _state_dict_in(blob: Any) -> dict[str, torch.Tensor] | None:
    def is_state(value: Any) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if is_state(blob):
        return blob
    if isinstance(blob, dict):
        return next((blob[k] for k in CHECKPOINT_KEYS if is_state(blob.get(k))), None)
    return None


def _foreign_meta(cfg: LRRAConfig, fmt: str) -> dict[str, Any]:
    """A foreign teacher's metadata: its contract from the config; accuracies come from check_teacher."""
    mean, std = input_contract(cfg)
    arch = cfg.teacher_arch if fmt == "state_dict" else fmt
    return {"format": fmt, "arch": arch, "dataset": cfg.dataset, "num_classes": cfg.num_classes,
            "channels": cfg.channels, "image_size": cfg.image_size, "mean": list(mean), "std": list(std),
            "test_accuracy": None}


def teacher_label(meta: dict[str, Any], path: str | Path) -> str:
    """How a run's first lines name its teacher: its architecture, or, for a compiled or pickled
    file, which names none, the file and its format."""
    if meta["format"] in (*COMPILED, "pickle"):
        return f"{Path(path).name} ({meta['format']})"
    return meta["arch"]


def check_teacher_meta(meta: dict[str, Any], cfg: LRRAConfig, path: str | Path) -> None:
    """Raise TeacherError when an LRRA teacher file's metadata contradicts the run's config."""
    for key, field in (("num_classes", "num_classes"), ("channels", "channels"),
                       ("image_size", "image_size"), ("arch", "teacher_arch"), ("dataset", "dataset")):
        if meta.get(key) != getattr(cfg, field):
            raise TeacherError(
                f"teacher {path} has {key}={meta.get(key)!r} but the config has {field}={getattr(cfg, field)!r} "
                f"(preset {cfg.preset!r}); use a matching teacher or --set {field}=...")
    if cfg.input_mean and "mean" in meta and (tuple(meta["mean"]), tuple(meta["std"])) != (
            per_channel(cfg.input_mean), per_channel(cfg.input_std)):
        raise TeacherError(f"teacher {path} records its normalisation (mean {meta['mean']}, std {meta['std']}), "
                           f"which input_mean/input_std contradict; leave them empty for this teacher")


@torch.no_grad()
def check_contract(model: nn.Module, meta: dict[str, Any], cfg: LRRAConfig, name: str) -> None:
    """The teacher takes [N, channels, image_size, image_size] and gives num_classes logits; else TeacherError."""
    shape = (2, cfg.channels, cfg.image_size, cfg.image_size)
    try:
        logits, _ = model(torch.zeros(shape), return_features=True)
    except Exception as err:  # noqa: BLE001 - whatever the network raises, the contract does not fit it
        raise TeacherError(f"teacher {name} rejects input of shape {list(shape)} (image_size={cfg.image_size}, "
                           f"channels={cfg.channels}): {first_line(err)}. Set image_size and channels to what "
                           "the teacher was trained on") from None
    width = logits.shape[-1]
    if width != cfg.num_classes:
        raise TeacherError(f"teacher {name} outputs {width} classes but num_classes={cfg.num_classes} "
                           f"(dataset {cfg.dataset!r}); distil it on a dataset of {width} classes "
                           f"(and --set num_classes={width})")
    meta["num_classes"] = width


def teacher_payload(model: nn.Module, meta: dict[str, Any], path: str | Path) -> Any:
    """What rebuilds the teacher in another process (a Ray worker): the file's bytes for compiled and
    pickled teachers, else the state_dict."""
    return Path(path).read_bytes() if meta.get("format") in (*COMPILED, "pickle") else model.state_dict()


def teacher_from_payload(payload: Any, meta: dict[str, Any], cfg: LRRAConfig) -> nn.Module:
    """The teacher teacher_payload described, rebuilt here."""
    if isinstance(payload, bytes):
        return read_teacher(payload, meta["format"], cfg, f"<{meta['format']} teacher>")[0]
    model = build_classifier(meta["arch"], meta["num_classes"], meta["channels"])
    model.load_state_dict(payload)
    return model.eval()


def first_line(err: BaseException) -> str:
    """An exception's first line: what a one-line error message quotes of it."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
