"""The browser assets the broker serves: the OHIF Viewer and Swagger UI, pinned npm packages.

`install` fetches a pinned package with `npm pack` (the npm registry, nothing else), refuses it
unless the tarball's sha256 is the one in `assets.lock`, and unpacks it outside the source tree,
one folder per package and version, so that a changed pin never serves stale files. It is safe
to run twice: an installed version is left alone. The routes only read what it installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from broker.errors import IntegrityError, Unavailable

LOCK = Path(__file__).with_name("assets.lock")
OHIF = "@ohif/app"
SWAGGER = "swagger-ui-dist"
# Partial page updates of the lookup and admin pages (they work without it too).
HTMX = "htmx.org"
# Where the broker mounts the viewer. OHIF's build assumes it lives at `/`; install rewrites it.
VIEWER_PATH = "/viewer/"
_MARKER = ".installed"


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    version: str
    sha256: str

    @property
    def slug(self) -> str:
        return self.name.lstrip("@").replace("/", "-")


def pins(lock: Path = LOCK) -> dict[str, Pin]:
    """The pinned packages of a lock file (default `assets.lock`), by npm name."""
    out: dict[str, Pin] = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, version, sha256 = line.split()
            out[name] = Pin(name=name, version=version, sha256=sha256)
    return out


def folder(*, root: Path, pin: Pin) -> Path:
    return root / pin.slug / pin.version


def installed(*, root: Path, pin: Pin) -> Path | None:
    """The folder of the pinned version if a complete install is there (the marker is written last)."""
    path = folder(root=root, pin=pin)
    return path if (path / _MARKER).is_file() else None


def install(*, root: Path, pin: Pin, tarball: Path | None = None) -> tuple[Path, bool]:
    """Fetch, check and unpack one pinned package; (its folder, whether anything was done).

    `tarball` skips `npm pack` (an offline copy). Raises Unavailable when npm cannot fetch it and
    IntegrityError when the checksum or the build's layout is not the pinned one; either way
    nothing is left installed.
    """
    done = installed(root=root, pin=pin)
    if done is not None:
        return done, False
    target = folder(root=root, pin=pin)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".install-", dir=target.parent) as tmp:
        tgz = tarball or _npm_pack(pin, Path(tmp))
        digest = _sha256(tgz)
        if digest != pin.sha256:
            raise IntegrityError(
                f"{pin.name}@{pin.version}: the tarball's sha256 is {digest}, not the pinned {pin.sha256}"
            )
        staging = Path(tmp) / "unpacked"
        # OHIF ships its complete build under dist/; Swagger UI's files sit at the package root.
        _unpack(tgz, staging, prefix="package/dist/" if pin.name == OHIF else "package/")
        if pin.name == OHIF:
            rewrite_public_path(staging, VIEWER_PATH)
        (staging / _MARKER).write_text(f"{pin.name}@{pin.version} sha256:{digest}\n")
        if target.exists():  # an earlier install that was interrupted before its marker
            shutil.rmtree(target)
        staging.rename(target)
    return target, True


def _npm_pack(pin: Pin, into: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm is not installed (Debian: apt-get install npm); it fetches the viewer")
    spec = f"{pin.name}@{pin.version}"
    result = subprocess.run(
        [npm, "pack", spec, "--json", "--silent", "--pack-destination", str(into)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"npm pack {spec} failed: {last}")
    filename = json.loads(result.stdout)[0]["filename"]
    return into / Path(filename).name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(tgz: Path, into: Path, *, prefix: str) -> None:
    """The members under `prefix`, with it stripped; tarfile's "data" filter refuses links out,
    absolute paths and device files."""

    def keep(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        if not member.name.startswith(prefix) or member.name == prefix:
            return None
        # Checked after stripping: "package/../x" is inside the archive's root but not inside ours.
        return tarfile.data_filter(member.replace(name=member.name[len(prefix) :]), dest)

    into.mkdir(parents=True)
    try:
        with tarfile.open(tgz) as tar:
            tar.extractall(into, filter=keep)
    except tarfile.TarError as exc:  # a broken archive, or a member pointing outside it
        raise IntegrityError(f"{tgz.name} cannot be unpacked safely: {exc}") from exc


def rewrite_public_path(dist: Path, base: str) -> None:
    """Make a build that assumes it is served at `/` work under `base` (e.g. `/viewer/`): the
    public URL and absolute links in index.html, webpack's public path in every chunk that sets
    it (lazy chunks and wasm load from there), and absolute `url(/` in the CSS (fonts)."""
    index = dist / "index.html"
    html = index.read_text()
    if 'window.PUBLIC_URL="/"' not in html:
        raise IntegrityError("the viewer's index.html does not set window.PUBLIC_URL as expected")
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{base}"')
    for attr in ('src="/', 'href="/', 'content="/'):
        html = html.replace(attr, attr[:-1] + base)
    index.write_text(html)
    chunks = 0
    for js in dist.glob("*.js"):
        text = js.read_text(errors="surrogateescape")
        if '__webpack_require__.p = "/";' in text:
            js.write_text(
                text.replace('__webpack_require__.p = "/";', f'__webpack_require__.p = "{base}";'),
                errors="surrogateescape",
            )
            chunks += 1
    if chunks == 0:
        raise IntegrityError("no chunk of the viewer sets webpack's public path as expected")
    for css in dist.glob("*.css"):
        text = css.read_text(errors="surrogateescape")
        if "url(/" in text:
            css.write_text(text.replace("url(/", f"url({base}"), errors="surrogateescape")
