"""The torch checkpoint reader: exact values, no code execution, clear errors on bad files."""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from fastvlm_mlx.convert.convert import read_weights
from fastvlm_mlx.convert.torch_pickle import load_torch_checkpoint
from fastvlm_mlx.errors import FastVLMError

TINY = Path(__file__).parent / "fixtures" / "fastvlm-tiny"
SHARD = TINY / "checkpoint-pytorch" / "pytorch_model-00001-of-00002.bin"


def _bits(array: mx.array) -> np.ndarray:
    """The raw bits of an array, so bf16 (which numpy lacks) compares exactly too."""
    return np.array(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)


def _write_zip(path: Path, records: dict[str, bytes], prefix: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            archive.writestr(f"{prefix}/{name}", data)
    return path


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Stand-ins for the torch globals, so ``pickle`` writes them the way ``torch.save`` does."""
    torch = types.ModuleType("torch")
    torch._utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "BoolStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    for name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
        stand_in = lambda *args: None  # noqa: E731 - only its name is pickled
        stand_in.__module__, stand_in.__qualname__ = "torch._utils", name
        setattr(torch._utils, name, stand_in)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", torch._utils)
    return torch


def _torch_save(path: Path, torch: types.ModuleType, storages: dict[str, np.ndarray],
                tensors: dict[str, tuple], byteorder: str = "little") -> Path:
    """Write what ``torch.save`` writes.

    ``tensors`` maps name -> (storage key, offset, size, stride), prefixed by "param" for an nn.Parameter.
    """
    kinds = {"float32": "FloatStorage", "float16": "HalfStorage", "uint16": "BFloat16Storage",
             "int64": "LongStorage", "bool": "BoolStorage"}

    class Storage:
        def __init__(self, key: str) -> None:
            self.key = key

    class Tensor:
        def __init__(self, key: str, offset: int, size: tuple, stride: tuple) -> None:
            self.args = (Storage(key), offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self) -> tuple:
            return torch._utils._rebuild_tensor_v2, self.args

    class Parameter:
        def __init__(self, tensor: Tensor) -> None:
            self.tensor = tensor

        def __reduce__(self) -> tuple:
            return torch._utils._rebuild_parameter, (self.tensor, True, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> tuple | None:
            if isinstance(obj, Storage):
                data = storages[obj.key]
                return ("storage", getattr(torch, kinds[data.dtype.name]), obj.key, "cpu", data.size)
            return None

    state = collections.OrderedDict(
        (name, Parameter(Tensor(*spec[1:])) if spec[0] == "param" else Tensor(*spec)) for name, spec in tensors.items()
    )
    pickled = io.BytesIO()
    Pickler(pickled, protocol=2).dump(state)
    order = "<" if byteorder == "little" else ">"
    records = {"data.pkl": pickled.getvalue(), "byteorder": byteorder.encode(), "version": b"3\n"}
    records |= {f"data/{key}": data.astype(data.dtype.newbyteorder(order)).tobytes() for key, data in storages.items()}
    return _write_zip(path, records)


def test_sharded_checkpoint_matches_safetensors() -> None:
    loaded = read_weights(TINY / "checkpoint-pytorch")  # the converter's way in: the directory
    expected = mx.load(str(TINY / "checkpoint" / "model.safetensors"))
    assert loaded.keys() == expected.keys()
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert np.array_equal(_bits(loaded[name]), _bits(array)), name
    by_index = load_torch_checkpoint(TINY / "checkpoint-pytorch" / "pytorch_model.bin.index.json")
    assert by_index.keys() == expected.keys()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])  # GLOBAL and STACK_GLOBAL opcodes
def test_pickled_code_is_refused_not_run(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    path = _write_zip(tmp_path / "pytorch_model.bin", {"data.pkl": pickle.dumps({"w": Exploit()}, protocol=protocol)})
    with pytest.raises(FastVLMError, match=r"refused pickle global '(os|posix)\.system' in pytorch_model\.bin"):
        load_torch_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_hand_built_checkpoint(tmp_path: Path, fake_torch: types.ModuleType, byteorder: str) -> None:
    halves = np.array([0.5, -1.25, 3.0, 65504.0, 1e-4, -0.0, 7.0, 2.5], dtype=np.float16)
    bf16_bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0001], dtype=np.uint16)  # 1, -2, inf, a subnormal
    longs = np.array([-(2**40), 7, 2**62], dtype=np.int64)
    storages = {"0": np.arange(6, dtype=np.float32), "1": halves, "2": longs, "3": bf16_bits,
                "4": np.array([True, False, True])}
    tensors = {
        "transposed": ("0", 0, (3, 2), (1, 3)),  # a 2x3 tensor's .T
        "column": ("0", 1, (2,), (3,)),  # a second view of the same storage
        "expanded": ("0", 0, (1, 6), (0, 1)),  # how transformers saves position_ids buffers
        "offset_half": ("1", 4, (2, 2), (2, 1)),
        "long": ("2", 0, (3,), (1,)),
        "bf16": ("3", 0, (4,), (1,)),
        "mask": ("4", 0, (3,), (1,)),
        "param": ("param", "0", 3, (3,), (1,)),
    }
    loaded = load_torch_checkpoint(_torch_save(tmp_path / "model.pt", fake_torch, storages, tensors, byteorder))

    assert loaded.keys() == tensors.keys()
    expected = {
        "transposed": (mx.float32, np.arange(6, dtype=np.float32).reshape(2, 3).T),
        "column": (mx.float32, np.array([1, 4], dtype=np.float32)),
        "expanded": (mx.float32, np.arange(6, dtype=np.float32)[None]),
        "offset_half": (mx.float16, halves[4:8].reshape(2, 2)),
        "long": (mx.int64, longs),
        "bf16": (mx.bfloat16, bf16_bits),
        "mask": (mx.bool_, np.array([True, False, True])),
        "param": (mx.float32, np.array([3, 4, 5], dtype=np.float32)),
    }
    for name, (dtype, values) in expected.items():
        assert loaded[name].dtype == dtype, name
        np.testing.assert_array_equal(_bits(loaded[name]), values, err_msg=name)
        assert _bits(loaded[name]).dtype == values.dtype, name


@pytest.mark.parametrize("view", [("0", 2, (2, 3), (3, 1)), ("0", 0, (7,), (0,))])  # past the end; bigger than it
def test_view_that_does_not_fit_its_storage_is_refused(tmp_path: Path, fake_torch: types.ModuleType,
                                                       view: tuple) -> None:
    path = _torch_save(tmp_path / "model.pt", fake_torch, {"0": np.zeros(6, np.float32)}, {"w": view})
    with pytest.raises(FastVLMError, match=r"cannot read model\.pt: .*does not fit its storage"):
        load_torch_checkpoint(path)


def test_truncated_shard_names_the_file(tmp_path: Path) -> None:
    data = SHARD.read_bytes()
    truncated = tmp_path / SHARD.name
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FastVLMError, match=rf"^{SHARD.name} is not a valid torch\.save zip") as error:
        load_torch_checkpoint(truncated)
    assert "\n" not in str(error.value)


def test_zip_without_data_pkl_is_refused(tmp_path: Path) -> None:
    path = _write_zip(tmp_path / "model.pt", {"data/0": b"\0" * 4})
    with pytest.raises(FastVLMError, match=r"model\.pt is not a torch\.save checkpoint: it holds 0 data\.pkl"):
        load_torch_checkpoint(path)


def test_legacy_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    with pytest.raises(FastVLMError, match=r"model\.pt uses torch's legacy .* re-save it with a recent torch"):
        load_torch_checkpoint(path)
