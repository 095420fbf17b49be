"""The published-weights registry and the download cache (issue 2, item 6). No test leaves the machine:
downloads come from a tiny HTTP server on 127.0.0.1; local files (file:// URLs, paths) are read in place."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from mlpmixer import create_model, load_checkpoint, save_checkpoint
from mlpmixer import pretrained
from mlpmixer.pretrained import (DownloadError, available, cache_dir, cache_path, download, find_weights,
                                 imagenet_class_names, load_pretrained, register_weights)


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries a test registers vanish after it."""
    monkeypatch.setattr(pretrained, "_REGISTRY", dict(pretrained._REGISTRY))


def source_file(folder: Path, size: int = 300_000, seed: int = 0) -> Path:
    path = folder / "source" / f"blob-{seed}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.uint8).numpy().tobytes())
    return path


def digits_checkpoint(folder: Path, num_classes: int = 1000, ext: str = ".npz") -> tuple[Path, torch.nn.Module]:
    model = create_model("digits/4", img_size=28, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    path = folder / "published" / f"digits{ext}"
    save_checkpoint(model, path)
    return path, model


# --- the registry -----------------------------------------------------------------------------


def test_official_and_timm_weights_are_registered() -> None:
    entries = set(available())
    gcs = "https://storage.googleapis.com/mixer_models"
    hf = "https://huggingface.co/timm"
    for variant, tag, url in [
        ("B/16", "imagenet1k", f"{gcs}/imagenet1k/Mixer-B_16.npz"),
        ("L/16", "imagenet1k", f"{gcs}/imagenet1k/Mixer-L_16.npz"),
        ("B/16", "imagenet21k", f"{gcs}/imagenet21k/Mixer-B_16.npz"),
        ("L/16", "imagenet21k", f"{gcs}/imagenet21k/Mixer-L_16.npz"),
        ("B/16", "sam", f"{gcs}/sam/Mixer-B_16.npz"),
        ("B/32", "sam", f"{gcs}/sam/Mixer-B_32.npz"),
        ("S/16", "gsam", f"{gcs}/gsam/Mixer-S_16.npz"),
        ("S/32", "gsam", f"{gcs}/gsam/Mixer-S_32.npz"),
        ("B/16", "gsam", f"{gcs}/gsam/Mixer-B_16.npz"),
        ("B/32", "gsam", f"{gcs}/gsam/Mixer-B_32.npz"),
        ("B/16", "goog_in21k_ft_in1k", f"{hf}/mixer_b16_224.goog_in21k_ft_in1k/resolve/main/model.safetensors"),
        ("B/16", "goog_in21k", f"{hf}/mixer_b16_224.goog_in21k/resolve/main/model.safetensors"),
        ("B/16", "miil_in21k_ft_in1k", f"{hf}/mixer_b16_224.miil_in21k_ft_in1k/resolve/main/model.safetensors"),
        ("B/16", "miil_in21k", f"{hf}/mixer_b16_224.miil_in21k/resolve/main/model.safetensors"),
        ("L/16", "goog_in21k_ft_in1k", f"{hf}/mixer_l16_224.goog_in21k_ft_in1k/resolve/main/model.safetensors"),
        ("L/16", "goog_in21k", f"{hf}/mixer_l16_224.goog_in21k/resolve/main/model.safetensors"),
    ]:
        assert (variant, tag, url) in entries
    assert len(entries) == 16
    assert find_weights("Mixer-L_16", "imagenet21k").num_classes == 21843
    miil = find_weights("mixer_b16_224", "miil_in21k_ft_in1k")
    assert (miil.mean, miil.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # MIIL's inputs are in [0, 1]
    assert find_weights("B/16", "sam").mean == (0.5, 0.5, 0.5)  # Google's are in [-1, 1]


def test_unknown_tag_lists_the_published_ones() -> None:
    with pytest.raises(ValueError, match=r"No pretrained weights 'jft' for Mixer-B/16: .*imagenet1k.*sam"):
        find_weights("B/16", "jft")
    with pytest.raises(ValueError, match="no weights are published for it"):
        create_model("H/14", pretrained="imagenet1k")
    with pytest.raises(ValueError, match="Unknown Mixer variant"):
        register_weights("Z/3", "x", "file:///nowhere")


def test_register_weights_accepts_aliases() -> None:
    entry = register_weights("mixer_s16_224", "mine", "https://example.org/w.npz", sha256="AB" * 32)
    assert entry.variant == "S/16" and entry.sha256 == "ab" * 32
    assert ("S/16", "mine", "https://example.org/w.npz") in available()
    assert find_weights("Mixer-S/16", "mine") is entry


def test_imagenet_class_names_from_torchvision() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish" and names[-1] == "toilet tissue"


# --- the cache --------------------------------------------------------------------------------


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLPMIXER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    a = cache_path("https://storage.googleapis.com/mixer_models/imagenet1k/Mixer-B_16.npz")
    b = cache_path("https://storage.googleapis.com/mixer_models/sam/Mixer-B_16.npz")
    assert a == tmp_path / "c/storage.googleapis.com/mixer_models/imagenet1k/Mixer-B_16.npz" and a != b
    assert cache_path("http://127.0.0.1:8080/../x/../w.npz") == tmp_path / "c/127.0.0.1_8080/x/w.npz"
    monkeypatch.delenv("MLPMIXER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home/.cache/mlpmixer"


# --- over HTTP ----------------------------------------------------------------------------------


class Server(http.server.ThreadingHTTPServer):
    data: bytes
    plan: list[str]  # what to do with each request in turn: ok, cut, ignore-range, slow, unsized-cut, 503, 404
    ranges: list[str | None]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        action = srv.plan.pop(0) if srv.plan else "ok"
        if action.isdigit():
            self.send_error(int(action))
            return
        start, asked = 0, self.headers.get("Range")
        if asked and action != "ignore-range":
            start = int(asked.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(srv.data) - 1}/{len(srv.data)}")
        else:
            self.send_response(200)
        body = srv.data[start:]
        if action != "unsized-cut":  # which announces no size, and breaks off half-way
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if action == "slow":  # ten pieces a twentieth of a second apart
            for i in range(10):
                self.wfile.write(body[i * len(body) // 10:(i + 1) * len(body) // 10])
                self.wfile.flush()
                time.sleep(0.05)
            return
        # "cut": the connection breaks half-way, after the headers promised the whole body.
        self.wfile.write(body[: len(body) // 2] if action in ("cut", "unsized-cut") else body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    srv.data = source_file(tmp_path, size=500_000, seed=3).read_bytes()
    srv.plan, srv.ranges = [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url_of(srv: Server, name: str = "w.npz") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/weights/{name}"


def test_http_broken_transfer_is_resumed_with_range(server: Server) -> None:
    server.plan = ["cut", "cut"]
    path = download(url_of(server), sha256=hashlib.sha256(server.data).hexdigest(), backoff_s=0.01)
    assert path.read_bytes() == server.data
    # 250,000 bytes arrive, then half the remaining 250,000, then the rest.
    assert server.ranges == [None, "bytes=250000-", "bytes=375000-"]


def test_http_server_ignoring_range_restarts(server: Server) -> None:
    server.plan = ["cut", "ignore-range"]
    path = download(url_of(server), backoff_s=0.01)
    assert path.read_bytes() == server.data and server.ranges == [None, "bytes=250000-"]


def test_http_retries_server_errors_not_missing_files(server: Server) -> None:
    server.plan = ["503", "503"]
    assert download(url_of(server), backoff_s=0.01).read_bytes() == server.data
    assert len(server.ranges) == 3
    server.plan, server.ranges = ["404"], []
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(url_of(server, "missing.npz"), backoff_s=0.01)
    assert len(server.ranges) == 1
    server.plan, server.ranges = ["cut"] * 10, []
    with pytest.raises(DownloadError, match=r"received .* of 500,000 bytes"):
        download(url_of(server, "flaky.npz"), retries=2, backoff_s=0.01)
    assert len(server.ranges) == 3
    part = cache_path(url_of(server, "flaky.npz"))
    assert part.with_name(part.name + ".part").exists()  # kept for the next try to resume


def test_download_once_then_from_the_cache(server: Server) -> None:
    path = download(url_of(server), sha256=hashlib.sha256(server.data).hexdigest())
    assert path == cache_path(url_of(server)) and path.read_bytes() == server.data
    assert not path.with_name(path.name + ".part").exists()
    server.plan = ["404"]  # the second call must not need the source
    assert download(url_of(server)) == path and path.read_bytes() == server.data and len(server.ranges) == 1


def test_offline_and_not_cached_names_url_and_cache_path(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    url = url_of(server)
    monkeypatch.setenv("MLPMIXER_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        download(url)
    assert url in str(err.value) and str(cache_path(url)) in str(err.value)
    for on in ("true", "YES"):  # the usual spellings of "on" forbid downloads too
        monkeypatch.setenv("MLPMIXER_OFFLINE", on)
        with pytest.raises(DownloadError) as err:
            download(url)
        assert f"MLPMIXER_OFFLINE={on} forbids" in str(err.value)  # the setting to unset, as it was given
    assert server.ranges == []  # nothing was asked of the server
    monkeypatch.delenv("MLPMIXER_OFFLINE")
    cached = download(url)
    monkeypatch.setenv("MLPMIXER_OFFLINE", "1")
    assert download(url) == cached  # offline works from the cache


def test_resume_a_partial_download(server: Server) -> None:
    part = cache_path(url_of(server)).with_name(cache_path(url_of(server)).name + ".part")
    part.parent.mkdir(parents=True)
    # The partial file's bytes differ from the source's: if the result keeps them, only the rest was read.
    part.write_bytes(b"\0" * 100_000)
    path = download(url_of(server))
    assert path.read_bytes() == b"\0" * 100_000 + server.data[100_000:] and server.ranges == ["bytes=100000-"]
    # With the digest known, such a corrupt resume is caught and nothing stays in the cache.
    part2 = cache_path(url_of(server, "w2.npz")).with_name("w2.npz.part")
    part2.write_bytes(b"\0" * 1000)
    with pytest.raises(DownloadError, match="SHA-256"):
        download(url_of(server, "w2.npz"), sha256=hashlib.sha256(server.data).hexdigest())
    assert list(path.parent.iterdir()) == [path]


def test_unreachable_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.npz"
    with pytest.raises(DownloadError) as err:
        download(url, retries=1, backoff_s=0.01)
    assert url in str(err.value) and str(cache_path(url)) in str(err.value) and "refused" in str(err.value)


def test_sha_mismatch_leaves_nothing(server: Server) -> None:
    with pytest.raises(DownloadError) as err:
        download(url_of(server), sha256="0" * 64)
    assert "SHA-256" in str(err.value) and url_of(server) in str(err.value)
    assert not any(p.is_file() for p in cache_dir().rglob("*") if ".locks" not in p.parts)  # no weights, whole or not


def test_local_files_are_used_in_place(tmp_path: Path) -> None:
    """A file:// URL or a path is not copied into the cache (a second copy of a large file); a digest, when
    given, is checked on every use, and a missing file is one sentence."""
    src = source_file(tmp_path)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for url in (src.as_uri(), str(src)):
        assert download(url, sha256=digest) == src
        with pytest.raises(DownloadError, match=f"{src} has SHA-256 {digest}, not the expected 0000"):
            download(url, sha256="0" * 64)
    assert not any(cache_dir().rglob("*"))
    assert src.read_bytes() and download(src.as_uri()) == src  # a wrong digest deletes nothing of the user's
    gone = tmp_path / "gone.npz"
    with pytest.raises(DownloadError, match=f"names a local file, and there is no file at {gone}; check the path"):
        download(gone.as_uri())
    with pytest.raises(DownloadError, match=f"names a local file, and there is a folder at {tmp_path}; check the"):
        download(str(tmp_path))


# --- pretrained models end to end ----------------------------------------------------------------


def test_create_model_with_pretrained_weights(tmp_path: Path) -> None:
    path, original = digits_checkpoint(tmp_path)
    register_weights("digits/4", "test", path.as_uri(), num_classes=1000)
    model = create_model("digits/4", pretrained="test")
    assert model.config.gelu == "tanh" and model.config.img_size == (28, 28)
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.class_names == imagenet_class_names()
    assert not any(cache_dir().rglob("*"))  # the local file is read where it is
    again = load_pretrained("digits/4", "test")
    assert torch.equal(again.head.weight, original.head.weight)
    tuned = load_pretrained("digits/4", "test", num_classes=10)
    assert tuned.num_classes == 10 and torch.count_nonzero(tuned.head.weight) == 0 and tuned.class_names is None
    ten = register_weights("digits/4", "ten", digits_checkpoint(tmp_path / "ten", num_classes=10)[0].as_uri())
    fresh = load_pretrained("digits/4", ten.tag, num_classes=1000)  # a new head: no ImageNet names for it
    assert fresh.num_classes == 1000 and torch.count_nonzero(fresh.head.weight) == 0 and fresh.class_names is None
    tagged = create_model("digits/4.test", pretrained=True)  # timm's "model.tag"
    assert torch.equal(tagged.head.weight, original.head.weight)
    with pytest.raises(ValueError, match="pretrained=True needs the weights named"):
        create_model("digits/4", pretrained=True)


def test_timm_style_pretrained_file_loads_with_exact_gelu(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = create_model("digits/4", img_size=28, num_classes=21)
    path = tmp_path / "hub" / "model.safetensors"
    path.parent.mkdir()
    save_file(model.state_dict(), path)  # no metadata, as on the Hugging Face hub
    register_weights("digits/4", "hub", path.as_uri(), num_classes=21)
    loaded = create_model("digits/4", pretrained="hub")
    assert loaded.config.gelu == "exact" and loaded.num_classes == 21 and loaded.class_names is None


def test_registry_entries_are_checked(tmp_path: Path) -> None:
    path, _ = digits_checkpoint(tmp_path, num_classes=10)
    register_weights("nano/4", "wrong-variant", path.as_uri())
    with pytest.raises(ValueError, match=r"holds a Mixer-digits/4, not the registered Mixer-nano/4"):
        load_pretrained("nano/4", "wrong-variant")
    register_weights("digits/4", "wrong-classes", path.as_uri(), num_classes=1000)
    with pytest.raises(ValueError, match="has 10 classes, not the registered 1000"):
        load_pretrained("digits/4", "wrong-classes")
    with pytest.raises(ValueError, match="224×224 images, not 448×448.*resize_to"):
        create_model("mixer_b16_448", pretrained="imagenet1k")  # refused before any download


def test_two_processes_downloading_one_file_take_turns(server: Server) -> None:
    """Both wrote one .part: the second truncated it to where it resumed, and a gap of zeros it left was moved into
    place by the first and loaded. Now the second waits, and finds the file cached."""
    import multiprocessing

    server.plan = ["slow"]
    other = multiprocessing.get_context("fork").Process(target=download, args=(url_of(server),))
    other.start()
    path = download(url_of(server))
    other.join(60)
    assert other.exitcode == 0 and path.read_bytes() == server.data and len(server.ranges) == 1
    assert list(path.parent.iterdir()) == [path]


def test_a_cached_file_is_checked_against_a_registered_digest(server: Server, capsys: pytest.CaptureFixture) -> None:
    """A digest was checked on the download only: a cached copy damaged since, or an older file at that address,
    loaded as it was."""
    digest = hashlib.sha256(server.data).hexdigest()
    path = download(url_of(server), sha256=digest)
    path.write_bytes(b"\0" * 64 + server.data[64:])
    capsys.readouterr()
    assert download(url_of(server), sha256=digest).read_bytes() == server.data and len(server.ranges) == 2
    assert f"The cached {path} does not have the registered SHA-256; downloading it again." in capsys.readouterr().err
    with pytest.raises(ValueError, match="sha256 is a SHA-256 digest in 64 hexadecimal digits .* not 'sha256:ab'"):
        register_weights("digits/4", "bad-digest", url_of(server), sha256="sha256:ab")


def test_a_damaged_cached_download_is_deleted_and_fetched_again(tmp_path: Path, server: Server) -> None:
    """A transfer cut short that announced no size (so none was checked) was kept as the cached file, and every later
    call read it again, saying "re-download" of a file nothing would download again."""
    path, original = digits_checkpoint(tmp_path, ext=".safetensors")
    server.data = path.read_bytes()
    server.plan = ["unsized-cut"]
    register_weights("digits/4", "ours", url_of(server, "model.safetensors"))
    with pytest.raises(ValueError, match="this cached download of .*model.safetensors was deleted, so the next "
                                         "attempt downloads it again"):
        load_pretrained("digits/4", "ours")
    assert not cache_path(url_of(server, "model.safetensors")).exists()
    assert torch.equal(load_pretrained("digits/4", "ours").head.weight, original.head.weight)
    with pytest.raises(ValueError, match="hidden_dim"):  # an override that does not fit the whole file: it stays
        load_pretrained("digits/4", "ours", hidden_dim=8)
    assert cache_path(url_of(server, "model.safetensors")).is_file()


def test_addresses_that_differ_in_their_query_are_cached_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPMIXER_CACHE", str(tmp_path / "c"))
    one, two = (cache_path(f"https://example.org/w.safetensors?rev={n}") for n in (1, 2))
    assert one != two and one.suffix == two.suffix == ".safetensors" and one.parent == tmp_path / "c/example.org"
    assert cache_path("https://example.org/w.safetensors") == tmp_path / "c/example.org/w.safetensors"


def test_loading_the_cached_file_directly(tmp_path: Path, server: Server) -> None:
    path, original = digits_checkpoint(tmp_path, ext=".safetensors")
    server.data = path.read_bytes()
    register_weights("digits/4", "ours", url_of(server, "model.safetensors"))
    cached = download(url_of(server, "model.safetensors"))
    assert cached != path and torch.equal(load_pretrained("digits/4", "ours").head.weight, original.head.weight)
    assert torch.equal(load_checkpoint(cached).head.weight, original.head.weight)


def test_weights_trained_on_other_pixels_take_ours(tmp_path: Path) -> None:
    """MIIL's weights were trained on pixels in [0, 1]: loaded, they take [-1, 1] like every model here."""
    model = create_model("nano/4", img_size=32, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    path = tmp_path / "miil.safetensors"
    save_checkpoint(model, path)
    mean, std = (0.1, 0.2, 0.3), (0.9, 0.5, 0.7)
    register_weights("nano/4", "other-pixels", path.as_uri(), mean=mean, std=std)
    folded = load_pretrained("nano/4", "other-pixels")
    pixels = torch.rand(4, 3, 32, 32)  # p / 255
    theirs = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ours = pixels * 2 - 1
    model.eval(), folded.eval()
    torch.testing.assert_close(folded(ours), model(theirs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(folded(ours), model(ours), atol=1e-3)  # the fold changed something
    register_weights("nano/4", "official-pixels", path.as_uri())  # [-1, 1]: loaded as saved
    assert torch.equal(load_pretrained("nano/4", "official-pixels").stem.proj.weight, model.stem.proj.weight)
    grey = tmp_path / "grey.safetensors"
    save_checkpoint(create_model("nano/4", img_size=32, in_chans=1), grey)
    register_weights("nano/4", "three-means", grey.as_uri(), mean=mean, std=std)
    with pytest.raises(ValueError, match="does not fit a model of 1 input channels"):
        load_pretrained("nano/4", "three-means")


def test_a_local_file_that_does_not_fit_its_entry_is_not_called_a_cached_one(tmp_path: Path) -> None:
    """A local file is the user's only copy: the mismatch errors said "(cached at PATH)" and "delete the cached
    file"."""
    path, _ = digits_checkpoint(tmp_path, num_classes=10)
    for url in (path.as_uri(), str(path)):
        register_weights("nano/4", "wrong-variant", url)
        register_weights("digits/4", "wrong-classes", url, num_classes=1000)
        for tag, said in (("wrong-variant", "holds a Mixer-digits/4, not the registered Mixer-nano/4"),
                          ("wrong-classes", "has 10 classes, not the registered 1000")):
            with pytest.raises(ValueError) as err:
                load_pretrained("nano/4" if tag == "wrong-variant" else "digits/4", tag)
            message = str(err.value)
            assert message.startswith(f"The local file {path} {said}; register it under the variant and classes it "
                                      "holds (register_weights)"), message
            assert "cached" not in message and "delete" not in message
    assert path.is_file()


def test_a_cache_that_is_a_file_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """MLPMIXER_CACHE naming a file gave "[Errno 20] Not a directory: ..." at the first download."""
    from PIL import Image

    from mlpmixer.cli import main

    cache = tmp_path / "cache"
    cache.write_text("")
    monkeypatch.setenv("MLPMIXER_CACHE", str(cache))
    image = tmp_path / "img.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", "--model", "S/16", "--pretrained", "gsam", str(image)]) == 2
    err = capsys.readouterr().err
    assert err == f"mixer predict: error: MLPMIXER_CACHE {cache} is a file; give the path of a folder.\n"
    with pytest.raises(NotADirectoryError, match=f"MLPMIXER_CACHE {cache / 'sub'} lies under {cache}, which is a "
                                                 "file; give another MLPMIXER_CACHE."):
        monkeypatch.setenv("MLPMIXER_CACHE", str(cache / "sub"))
        download("https://example.org/w.npz")
