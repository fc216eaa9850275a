"""Read ``torch.save`` checkpoints without torch and without running pickled code.

A checkpoint is a zip holding ``<prefix>/data.pkl``, a pickle whose tensors point
at storages, and ``<prefix>/data/<key>``, each storage's raw bytes. Unpickling an
untrusted file can call any importable function, so the unpickler here admits
only the few globals a tensor state dict is made of.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.utils import read_weight_map

INDEX_NAME = "pytorch_model.bin.index.json"

# What torch < 1.6 (or _use_new_zipfile_serialization=False) writes first: a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

# torch storage class -> numpy element type; bf16 has no numpy type, so its bits are read as uint16.
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "BoolStorage": "?",
}


class _StorageType(NamedTuple):
    """Stands in for ``torch.<name>``; immutable, so a pickle cannot alter it."""

    name: str


class _Storage(NamedTuple):
    """A storage's elements in native byte order (bf16 as its uint16 bit patterns)."""

    data: np.ndarray
    bfloat16: bool


class _Tensor(NamedTuple):
    """Holds a loaded array until unpickling ends: a pickle's BUILD opcode could call
    ``mx.array.__setstate__`` on a bare array, but finds nothing to set on a NamedTuple."""

    array: mx.array


def _is_ints(values: Any) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, int) and v >= 0 for v in values)


class _Unpickler(pickle._Unpickler):
    """Unpickles ``data.pkl`` into tensors; refuses every other global.

    This is the pure-Python unpickler: the C one sizes its memo by the largest memo
    index in the file, so a single corrupt byte can make it allocate gigabytes.
    The rebuild functions are bound methods so that a pickle's BUILD opcode cannot
    set attributes (such as ``__defaults__``) on anything shared between loads.
    """

    def __init__(self, archive: zipfile.ZipFile, prefix: str, label: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self._archive = archive
        self._prefix = prefix
        self._label = label
        # Files from before torch recorded the byte order are little-endian.
        big = f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder") == b"big"
        self._byteorder = ">" if big else "<"
        self._storages: dict[tuple[str, str], _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise FastVLMError(
            f"refused pickle global '{module}.{name}' in {self._label}: checkpoints may not execute code"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        match pid:
            case ("storage", _StorageType(name=name), str() as key, _, int() as numel) if numel >= 0:
                if (key, name) not in self._storages:
                    code = _STORAGE_DTYPES[name]
                    raw = self._archive.read(f"{self._prefix}/data/{key}")
                    data = np.frombuffer(raw, self._byteorder + code, count=numel)
                    self._storages[key, name] = _Storage(data.astype(code, copy=False), name == "BFloat16Storage")
                return self._storages[key, name]
        raise ValueError(f"unexpected persistent id {pid!r}")

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        metadata: Any = None,
    ) -> _Tensor:
        """Copy the strided view ``size``/``stride`` at ``storage_offset`` out of ``storage``."""
        if not (
            isinstance(storage, _Storage)
            and isinstance(storage_offset, int)
            and storage_offset >= 0
            and _is_ints(size)
            and _is_ints(stride)
            and len(size) == len(stride)
        ):
            raise ValueError("malformed tensor record")
        data = storage.data
        # as_strided reads whatever memory it is pointed at, and a stride of 0 repeats elements
        # without bound, so a view must stay inside its storage and hold no more elements than it.
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if math.prod(size) > data.size or (all(size) and last >= data.size):
            raise ValueError(f"a tensor of size {size} and stride {stride} does not fit its storage")
        view = np.lib.stride_tricks.as_strided(
            data[storage_offset:], size, tuple(s * data.itemsize for s in stride), writeable=False
        )
        tensor = mx.array(np.ascontiguousarray(view))
        return _Tensor(tensor.view(mx.bfloat16) if storage.bfloat16 else tensor)

    def _rebuild_parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> _Tensor:
        """``nn.Parameter`` wraps a tensor; keep the tensor."""
        if not isinstance(data, _Tensor):
            raise ValueError("malformed parameter record")
        return data


def _load_file(path: Path) -> dict[str, mx.array]:
    """Load one ``torch.save`` zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                found = f"{len(pickles)} data.pkl, not 1"
                raise FastVLMError(f"{path.name} is not a torch.save checkpoint: it holds {found}")
            state = _Unpickler(archive, pickles[0].removesuffix("/data.pkl"), path.name).load()
    except FastVLMError:
        raise
    except zipfile.BadZipFile as error:
        with path.open("rb") as file:
            if file.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC:
                raise FastVLMError(
                    f"{path.name} uses torch's legacy (pre-1.6) format, which is not supported; "
                    "re-save it with a recent torch"
                ) from error
        raise FastVLMError(f"{path.name} is not a valid torch.save zip (truncated or corrupt?): {error}") from error
    except Exception as error:  # anything else going wrong while decoding an untrusted file means a bad file
        raise FastVLMError(f"cannot read {path.name}: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in state.items()):
        raise FastVLMError(f"{path.name} is not a state dict of tensors")
    return {name: tensor.array for name, tensor in state.items()}


def load_torch_checkpoint(path: str | Path) -> dict[str, mx.array]:
    """Load a torch checkpoint: one ``.bin``/``.pt`` file or a shard index json."""
    path = Path(path)
    if path.suffix != ".json":
        return _load_file(path)
    weight_map = read_weight_map(path)
    weights: dict[str, mx.array] = {}
    for shard in sorted(set(weight_map.values())):
        weights.update(_load_file(shard))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise FastVLMError(f"{path.name} maps {missing[0]!r} to {weight_map[missing[0]].name}, which does not hold it")
    return weights
