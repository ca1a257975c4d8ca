"""Saving an ONNX model atomically, with its external-data file when it needs one.

The ONNX-specific half of ``contracts.atomic``: ``onnx.save_model`` writes the external-data file
under the name recorded inside the model, so both files are first written into a private
temporary folder, then handed to an ``AtomicFiles`` set and renamed into place together (with
any other outputs of the same set, e.g. the other graph and the folder's manifest).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gsnet_deploy.contracts.atomic import PART_MARK, AtomicFiles

if TYPE_CHECKING:
    import onnx

# Protobuf cannot serialize a single message over 2 GiB; larger models keep weights outside.
PROTOBUF_LIMIT = 2_000_000_000


def save_onnx_atomic(model: onnx.ModelProto, path: Path, files: AtomicFiles | None = None) -> Path:
    """Save ``model`` to ``path`` so that it appears complete or not at all.

    Models over protobuf's 2 GiB limit store their weights in ``<name>.data`` beside the file; the
    two files are committed together.

    Args:
        model: the model (converted to external data in place when it is over the limit).
        path: final file name.
        files: a set the model joins (committed by its owner); None: the model is committed alone.

    Returns:
        ``path``.

    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if files is None:
        with AtomicFiles() as own:
            save_onnx_atomic(model, path, own)
        return path
    if model.ByteSize() <= PROTOBUF_LIMIT:
        onnx.save_model(model, str(files.part(path)))
        return path
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", suffix=PART_MARK, dir=path.parent) as tmp:
        onnx.save_model(
            model, str(Path(tmp) / path.name), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
        )
        if (Path(tmp) / data_name).is_file():  # absent when every tensor is under onnx's 1 KiB threshold
            os.replace(Path(tmp) / data_name, files.part(path.parent / data_name))
        os.replace(Path(tmp) / path.name, files.part(path))
    return path
