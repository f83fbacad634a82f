"""Where a run's files live: a local folder, or a prefix in an object store (`s3://bucket/prefix`,
`gs://...`, any URI pyarrow.fs resolves). Checkpoints, the manifest and Ray Train's storage all
go through a `Location`, so no code path assumes every node mounts the same folder.

- An S3-compatible store's endpoint comes from `AWS_ENDPOINT_URL` or the URI's
  `?endpoint_override=`; credentials from the usual AWS variables (or the node's role), never
  from the URI: they would land in MLflow tags and the manifest.
- Writes are whole or nothing: a folder is renamed into place, an object appears when its one
  upload closes; a checkpoint folder uploads its marker file (`config.json`) last.
- Readers of a remote folder get a local copy in a temporary folder, removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from hft_ray.errors import UserError

SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token")


def credentials_in(uri: str) -> str | None:
    """What of the AWS credentials `uri` carries (None if none): refused wherever a URI is given."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        return "a user name or password before the bucket"
    secret = [key for key, _ in parse_qsl(parts.query) if key in SECRET_QUERY_KEYS]
    return f"?{secret[0]}=" if secret else None


class Location:
    """A folder or an object-store prefix; `/` joins names onto it (before any `?query`)."""

    def __init__(self, where: str | Path | Location):
        text = str(where)
        self.remote = "://" in text
        if self.remote:
            parts = urlsplit(text)
            self._base = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
            self._query = parts.query
        else:
            self._base, self._query = str(Path(text).expanduser().resolve()), ""

    def __truediv__(self, name: str) -> Location:
        joined = f"{self._base}/{name}" if self.remote else os.path.join(self._base, name)
        return Location(joined + (f"?{self._query}" if self._query else ""))

    def __str__(self) -> str:
        return self._base + (f"?{self._query}" if self._query else "")

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self._base.rstrip("/").rsplit("/", 1)[-1]

    @property
    def path(self) -> Path:
        """The local folder (a local location only)."""
        if self.remote:
            raise ValueError(f"{self} is not a local path")
        return Path(self._base)

    def filesystem(self):
        """(pyarrow filesystem, path in it): what Ray Train's `storage_filesystem` takes."""
        import pyarrow.fs

        if not self.remote:
            return pyarrow.fs.LocalFileSystem(), self._base
        return pyarrow.fs.FileSystem.from_uri(str(self))

    def for_ray(self):
        """(storage_path, storage_filesystem) as Ray Train's and Tune's RunConfig take them: a
        folder as itself (no filesystem), an object store as its path in the pyarrow filesystem
        hft-ray uses too."""
        if not self.remote:
            return str(self), None
        filesystem, path = self.filesystem()
        return path, filesystem

    def _info(self):
        fs, path = self.filesystem()
        return fs.get_file_info(path)

    def is_file(self) -> bool:
        if not self.remote:
            return self.path.is_file()
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.File

    def exists(self) -> bool:
        if not self.remote:
            return self.path.exists()
        import pyarrow.fs

        return self._info().type != pyarrow.fs.FileType.NotFound

    def read_text(self) -> str:
        if not self.remote:
            return self.path.read_text()
        fs, path = self.filesystem()
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, text: str) -> None:
        """Whole or not at all: a local file is renamed into place; an object appears when its
        single upload closes."""
        if self.remote:
            fs, path = self.filesystem()
            with fs.open_output_stream(path) as out:
                out.write(text.encode())
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{self.name}.", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def remove(self) -> None:
        """The folder (or file) and all under it; nothing if it is not there."""
        if not self.remote:
            if self.path.is_dir():
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                self.path.unlink(missing_ok=True)
            return
        import pyarrow.fs

        fs, path = self.filesystem()
        kind = fs.get_file_info(path).type
        if kind == pyarrow.fs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pyarrow.fs.FileType.File:
            fs.delete_file(path)

    @contextlib.contextmanager
    def local_copy(self, without: tuple[str, ...] = ()) -> Iterator[Path]:
        """The folder here: itself if local, else downloaded into a temporary folder (removed after),
        leaving out the files whose names end with one of `without` (a rank that reads a
        checkpoint's config and tokenizer need not fetch its weights)."""
        if not self.remote:
            yield self.path
            return
        import pyarrow.fs

        fs, path = self.filesystem()
        local = pyarrow.fs.LocalFileSystem()
        with tempfile.TemporaryDirectory(prefix="hft-ray-download-") as folder:
            if not without:
                pyarrow.fs.copy_files(path, folder, source_filesystem=fs, destination_filesystem=local)
            for info in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True)) if without else []:
                if info.type == pyarrow.fs.FileType.File and not info.path.endswith(without):
                    target = Path(folder) / info.path[len(path):].lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    pyarrow.fs.copy_files(info.path, str(target), source_filesystem=fs, destination_filesystem=local)
            yield Path(folder)

    def upload(self, folder: Path, last: str) -> None:
        """Copy the local `folder` here, file by file, `last` after all the others (a reader takes
        the folder for whole once `last` is there). What was here before is removed first."""
        import pyarrow.fs

        fs, path = self.filesystem()
        self.remove()
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        try:
            for file in sorted(files, key=lambda p: p.relative_to(folder).as_posix() == last):
                pyarrow.fs.copy_files(str(file), f"{path}/{file.relative_to(folder).as_posix()}",
                                      source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
        except BaseException:
            with contextlib.suppress(Exception):  # what went up is no checkpoint (no marker): leave none
                self.remove()
            raise


def check_writable(location: Location, key: str) -> None:
    """Refuse (UserError, naming `key`) storage this process cannot write: a missing bucket,
    refused credentials, an unreachable endpoint. Writes and deletes one small object."""
    if not location.remote:
        return
    probe = location / f".hft-ray-probe-{os.getpid()}"
    try:
        probe.write_text("probe")
        probe.remove()
    except Exception as error:  # pyarrow raises OSError; a bad scheme raises ValueError or ArrowInvalid
        raise UserError(f"{key} {location}: cannot write there: {_one_line(error)}. " + _advice(str(error))) from None


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


REFUSED = ("ACCESSDENIED", "INVALIDACCESSKEYID", "SIGNATUREDOESNOTMATCH", "EXPIREDTOKEN", "INVALIDTOKEN",
           "INVALIDCLIENTTOKENID", "HTTP STATUS 403")


def _advice(message: str) -> str:
    squeezed = message.upper().replace("_", "")
    if "NOSUCHBUCKET" in squeezed:
        return "Create the bucket first, or name one that exists."
    if any(word in squeezed for word in REFUSED):
        return ("The store refused the credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                "AWS_SESSION_TOKEN if temporary) to a key allowed to write there.")
    return "Check the URI, AWS_ENDPOINT_URL (for an S3-compatible store) and the network."
