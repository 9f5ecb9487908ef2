"""Our own reader and writer of the safetensors format, plus file digests.

Format: 8-byte little-endian header length ``N``, then ``N`` bytes of JSON (an object mapping tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``"__metadata__"``
object of strings), then the data buffer; offsets are relative to the start of that buffer.

Why not ``safetensors.safe_open``: it memory-maps the file, so streaming a 28 GB checkpoint layer by
layer grows the resident set with every page touched. :class:`SafeTensorsFile` reads each tensor with
``seek`` + ``readinto`` straight into the tensor's own memory, so only the tensors the caller holds stay
in RAM. :class:`StreamingWriter` is the mirror image: the header is computed up front from the declared
shapes, each tensor is written at its offset as soon as it exists, and the result only appears at the
destination path (atomically, via ``os.replace``) once every tensor has been written.

Byte order: safetensors data is little-endian; like the official library we assume a little-endian host.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import BinaryIO

import torch

from ..errors import CasaError

__all__ = [
    "DTYPES",
    "SafeTensorsFile",
    "StreamingWriter",
    "write_file",
    "file_digest",
]

#: safetensors dtype name -> torch dtype (the ones this project reads and writes).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):  # MXFP8's block scales (torch >= 2.7)
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# The official implementation refuses headers above 100 MB; anything larger is not a real file.
_MAX_HEADER_BYTES = 100_000_000
_DIGEST_CHUNK = 16 * 1024 * 1024
_DIGEST_MEMO_NAME = "file_digests.json"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


class SafeTensorsFile:
    """A safetensors file opened for reading, one tensor at a time (no mmap).

    The header is validated completely when the file is opened, so a damaged or truncated file fails
    here with one sentence naming it, not half-way through a long computation. ``get`` is safe to call
    from several threads (reads are serialised on the open handle).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path: str = os.fspath(path)
        try:
            self._fh: BinaryIO = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            raise CasaError(f"{self.path} does not exist", file=self.path) from None
        except IsADirectoryError:
            raise CasaError(f"{self.path} is a folder, not a safetensors file", file=self.path) from None
        self._lock = threading.Lock()
        try:
            self._entries, self.metadata, self._data_start = self._read_header()
        except BaseException:
            self._fh.close()
            raise

    # -- header -------------------------------------------------------------------------------------

    def _not_safetensors(self, why: str) -> CasaError:
        try:
            size = os.fstat(self._fh.fileno()).st_size
            head = self._read_exact(0, 8) if size >= 8 else b""
        except (OSError, CasaError):
            size, head = 0, b""
        # torch.save's zip; or a bare pickle (protocol 2-5), whose first 8 bytes read as a header length beyond
        # the file (a damaged safetensors file whose length happens to start with those two bytes is not one)
        pickled = head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") and \
            struct.unpack("<Q", head)[0] > size
        if head.startswith(b"PK\x03\x04") or pickled:
            why = ("it is a PyTorch pickle file (.pt, .ckpt, .bin): casa-lora reads only safetensors, because "
                   "loading a pickle can run any code; convert it to .safetensors, which ComfyUI and the trainers "
                   "also write")
        return CasaError(f"{self.path} is not a safetensors file ({why})", file=self.path)

    def _read_header(self) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], dict[str, str], int]:
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise self._not_safetensors(f"it is only {size} bytes long")
        (header_len,) = struct.unpack("<Q", self._read_exact(0, 8))
        if header_len < 2 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise self._not_safetensors(f"its header length {header_len} does not fit a file of {size} bytes")
        raw = self._read_exact(8, header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._not_safetensors("its header is not JSON") from None
        if not isinstance(header, dict):
            raise self._not_safetensors("its header is not a JSON object")

        data_start = 8 + header_len
        metadata_raw = header.pop("__metadata__", None) or {}
        if not isinstance(metadata_raw, dict):
            raise self._not_safetensors("its __metadata__ is not a JSON object")
        metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata_raw.items()}

        entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype_name = info["dtype"]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (TypeError, KeyError, ValueError):
                raise self._not_safetensors(f"the header entry of tensor '{key}' is malformed") from None
            if any(d < 0 for d in shape) or begin < 0 or end < begin:
                raise self._not_safetensors(f"the header entry of tensor '{key}' is malformed")
            dtype = DTYPES.get(dtype_name)
            if dtype is None:
                raise CasaError(
                    f"{self.path}: tensor '{key}' has dtype '{dtype_name}', which this reader does not support",
                    file=self.path,
                )
            expected = _numel(shape) * _itemsize(dtype)
            if end - begin != expected:
                raise CasaError(
                    f"{self.path}: tensor '{key}' is {list(shape)} {dtype_name} ({expected} bytes) "
                    f"but its data_offsets span {end - begin} bytes",
                    file=self.path,
                )
            if data_start + end > size:
                raise CasaError(
                    f"{self.path} is truncated: tensor '{key}' needs bytes up to {data_start + end} "
                    f"but the file has only {size}",
                    file=self.path,
                )
            entries[key] = (dtype, shape, begin, end)
        ordered = dict(sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])))
        return ordered, metadata, data_start

    def _read_exact(self, offset: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self._read_into(offset, memoryview(buf))
        return bytes(buf)

    def _read_into(self, offset: int, view: memoryview) -> None:
        with self._lock:
            self._fh.seek(offset)
            done = 0
            total = len(view)
            while done < total:
                n = self._fh.readinto(view[done:])
                if not n:
                    raise CasaError(f"{self.path} is truncated: reading stopped at byte {offset + done}",
                                    file=self.path)
                done += n

    # -- queries ------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor '{key}'") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[0]

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entry(key)
        return end - begin

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` on the CPU, in its stored dtype, owning its memory."""
        dtype, shape, begin, end = self._entry(key)
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            self._read_into(self._data_start + begin, memoryview(raw.numpy()))
        return raw.view(dtype).reshape(shape)

    # -- lifetime -----------------------------------------------------------------------------------

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SafeTensorsFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class StreamingWriter:
    """Write a safetensors file tensor by tensor, atomically.

    ``entries`` declares every tensor (name, dtype, shape) so the header, and with it each tensor's
    offset, is known before any data exists. Tensors are then written with :meth:`write` in any order
    into ``f"{path}.partial-{pid}"`` in the destination folder; :meth:`commit` checks that all were
    written, fsyncs and renames onto ``path``. Used as a context manager it commits on normal exit and
    aborts (deletes the temporary file) on an exception, so an interrupted write never leaves a file at
    ``path``.
    """

    def __init__(self, path: str | os.PathLike[str],
                 entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path: str = os.fspath(path)
        self.temp_path: str = f"{self.path}.partial-{os.getpid()}"
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        header: dict[str, object] = {}
        if metadata:
            bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
            if bad:
                raise TypeError(f"safetensors metadata must be dict[str, str]; offending keys: {bad[:5]}")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, dtype, shape in entries:
            if name == "__metadata__" or name in self._layout:
                raise ValueError(f"tensor name '{name}' is reserved or declared twice")
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors here")
            shape = tuple(int(d) for d in shape)
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (dtype, shape, offset)
            offset += nbytes
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
        header_bytes += b" " * (-len(header_bytes) % 8)  # align the data buffer to 8 bytes
        self._data_start = 8 + len(header_bytes)
        self._written: set[str] = set()
        self._done = False
        self._fh: BinaryIO = open(self.temp_path, "wb")  # noqa: SIM115 - closed in commit()/abort()
        try:
            self._fh.write(struct.pack("<Q", len(header_bytes)))
            self._fh.write(header_bytes)
            self._fh.truncate(self._data_start + offset)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one declared tensor (converted to the declared dtype; the shape must match)."""
        if self._done:
            raise RuntimeError(f"{self.path}: write after commit/abort")
        try:
            dtype, shape, offset = self._layout[name]
        except KeyError:
            raise ValueError(f"tensor '{name}' was not declared for {self.path}") from None
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor '{name}' has shape {tuple(tensor.shape)}, declared {shape}")
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
        if data.numel():
            self._fh.seek(self._data_start + offset)
            self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self._written.add(name)

    def commit(self) -> None:
        """Check every tensor was written, flush, fsync and move the file onto ``path``."""
        if self._done:
            raise RuntimeError(f"{self.path}: commit after commit/abort")
        missing = [n for n in self._layout if n not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} declared tensors were never written "
                             f"(first: {missing[:3]})")
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        _fsync_folder(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Discard the temporary file; nothing appears at ``path``."""
        self._done = True
        try:
            self._fh.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.temp_path)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            if not self._done:
                self.abort()
        elif not self._done:
            self.commit()


def _fsync_folder(folder: str) -> None:
    """Make a rename durable where the platform allows it (POSIX); a no-op elsewhere."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (in their own dtypes) to ``path`` atomically."""
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with StreamingWriter(path, entries, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)


# -- digests ---------------------------------------------------------------------------------------


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    buf = bytearray(_DIGEST_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(view)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str], memo_dir: str | os.PathLike[str] | None = None) -> str:
    """Hex blake2b (20-byte digest) of the whole file, streamed in 16 MiB chunks.

    With ``memo_dir``, digests are memoised in ``memo_dir/file_digests.json`` keyed by a hash of the
    file's real path (the memo never stores a path in clear) and checked against its size and
    ``st_mtime_ns``; an entry whose size or mtime no longer matches is recomputed and replaced.
    """
    real = os.path.realpath(os.fspath(path))
    if memo_dir is None:
        return _hash_file(real)
    st = os.stat(real)
    memo_path = os.path.join(os.fspath(memo_dir), _DIGEST_MEMO_NAME)
    memo = _load_memo(memo_path)
    slot = "path:" + hashlib.blake2b(real.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
    entry = memo.get(slot)
    if (isinstance(entry, dict) and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns and isinstance(entry.get("digest"), str)):
        return entry["digest"]
    digest = _hash_file(real)
    memo = _load_memo(memo_path)  # re-read: another process may have added entries meanwhile
    memo[slot] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest}
    try:
        _store_memo(memo_path, memo)
    except OSError:  # a read-only or unusable memo folder: the digest is right, only not remembered
        pass
    return digest


def _load_memo(memo_path: str) -> dict[str, object]:
    try:
        with open(memo_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_memo(memo_path: str, memo: dict[str, object]) -> None:
    folder = os.path.dirname(memo_path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".file_digests.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(memo, fh, indent=1, sort_keys=True)
        os.replace(tmp, memo_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
