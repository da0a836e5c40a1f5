"""`scanonce web install` installs only what is pinned: a tarball whose checksum differs, or one
that would write outside its folder, leaves nothing installed; a second run changes nothing."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from broker.errors import IntegrityError
from broker.web import assets

INDEX = (
    '<html><head><script>window.PUBLIC_URL="/"</script><link href="/app.bundle.css" rel="stylesheet">'
    '<script src="/app-config.js"></script></head></html>'
)


def _tarball(path: Path, files: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _viewer_files() -> dict[str, str]:
    return {
        "package/package.json": "{}",
        "package/dist/index.html": INDEX,
        "package/dist/app.bundle.1.js": '__webpack_require__.p = "/";\nimport("./2.bundle.js")',
        "package/dist/app.bundle.css": "@font-face{src:url(/a.woff2)}",
    }


def test_a_pinned_viewer_is_unpacked_and_rewritten_for_its_path(tmp_path: Path) -> None:
    tgz = tmp_path / "ohif.tgz"
    pin = assets.Pin(name=assets.OHIF, version="0.0.1", sha256=_tarball(tgz, _viewer_files()))
    root = tmp_path / "web"
    path, done = assets.install(root=root, pin=pin, tarball=tgz)
    assert done and path == root / "ohif-app" / "0.0.1"
    assert assets.installed(root=root, pin=pin) == path
    assert not (path / "package.json").exists()  # only the build
    html = (path / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in html and 'href="/viewer/app.bundle.css"' in html
    assert '__webpack_require__.p = "/viewer/";' in (path / "app.bundle.1.js").read_text()
    assert "url(/viewer/a.woff2)" in (path / "app.bundle.css").read_text()
    # Safe to run twice: nothing is fetched or rewritten again.
    tgz.unlink()
    assert assets.install(root=root, pin=pin, tarball=tgz) == (path, False)
    assert 'PUBLIC_URL="/viewer/"' in (path / "index.html").read_text()


def test_a_checksum_that_differs_installs_nothing(tmp_path: Path) -> None:
    tgz = tmp_path / "ohif.tgz"
    _tarball(tgz, _viewer_files())
    pin = assets.Pin(name=assets.OHIF, version="0.0.1", sha256="0" * 64)
    root = tmp_path / "web"
    with pytest.raises(IntegrityError, match="not the pinned"):
        assets.install(root=root, pin=pin, tarball=tgz)
    assert assets.installed(root=root, pin=pin) is None
    assert list((root / "ohif-app").iterdir()) == []  # no partial folder either


def test_a_member_escaping_the_folder_installs_nothing(tmp_path: Path) -> None:
    tgz = tmp_path / "evil.tgz"
    pin = assets.Pin(
        name=assets.SWAGGER,
        version="0.0.1",
        sha256=_tarball(tgz, {"package/ok.js": "", "package/../escaped.js": "x"}),
    )
    with pytest.raises(IntegrityError):
        assets.install(root=tmp_path / "web", pin=pin, tarball=tgz)
    assert not list(tmp_path.rglob("escaped.js"))
    assert assets.installed(root=tmp_path / "web", pin=pin) is None


def test_every_pin_is_exact() -> None:
    pins = assets.pins()
    assert set(pins) == {assets.OHIF, assets.SWAGGER, assets.HTMX}
    test_pins = assets.pins(Path(__file__).with_name("assets.lock"))
    assert set(test_pins) == {"axe-core"}
    for pin in [*pins.values(), *test_pins.values()]:
        assert all(part.isdigit() for part in pin.version.split(".")), pin  # no ranges, no tags
        assert len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0
