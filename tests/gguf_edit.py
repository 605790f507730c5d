"""Rewrite a GGUF file with edits, to make broken files for the loader's error tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np


def rewrite(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    drop_tensors=(),
    edit_fields: dict | None = None,
    drop_fields=(),
    edit_tensor: Callable | None = None,
    split_tensor: Callable | None = None,
) -> Path:
    """Copy `src` to `dst`, changing the architecture string, dropping tensors or fields,
    replacing field values ({key: (value, GGUFValueType, sub_type)}), or editing tensors
    (`edit_tensor(name, data, type, ne) -> (data, type, ne)`, raw numpy bytes for quants;
    `split_tensor(name, data, type, ne) -> [(name, data, type, ne), ...]` writes several
    tensors in its place, or None to keep it)."""
    r = gguf.GGUFReader(str(src))
    arch_now = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch or arch_now)
    edit_fields = edit_fields or {}
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_fields:
            continue
        if name in edit_fields:
            val, vtype, sub = edit_fields[name]
            w.add_key_value(name, val, vtype, sub_type=sub)
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data, ttype, ne = np.array(t.data), t.tensor_type, [int(x) for x in t.shape]
        if edit_tensor is not None:
            data, ttype, ne = edit_tensor(t.name, data, ttype, ne)
        parts = split_tensor(t.name, data, ttype, ne) if split_tensor is not None else None
        for name, p_data, p_type, p_ne in parts or [(t.name, data, ttype, ne)]:
            if p_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor(name, p_data.reshape(list(reversed(p_ne))), raw_dtype=p_type)
            else:
                w.add_tensor(name, p_data, raw_dtype=p_type)  # data: [rows, bytes per row]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
