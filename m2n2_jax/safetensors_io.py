"""Read and write safetensors checkpoints as flax model pytrees (no pickle anywhere).

A checkpoint is one `.safetensors` file or a directory of them (Hugging Face layout:
`model.safetensors`, or shards `model-00001-of-00002.safetensors` listed in
`model.safetensors.index.json`). A directory holds one checkpoint: a save replaces
the safetensors files and index of an earlier one whole (other files stay), and a
directory holding both an index and `model.safetensors` is refused. Flat tensor
names map to nested dicts by splitting on `sep`: "layer_0/attn/qkv/kernel" <->
model["layer_0"]["attn"]["qkv"]["kernel"] (use sep="." for names like
"model.layers.0.mlp.up_proj.weight"). Arrays keep their dtype (bfloat16 included)
and are returned as host NumPy arrays.

Two fine-tunes of one base often differ in vocabulary size (an added token: 32,001 vs
32,000 rows). `split_vocab` cuts both to the shared rows, so M2N2 or any operator of
`merge_ops` can merge them, and `join_vocab` puts the extra rows back on the merge.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def flatten(model, sep: str = "/") -> dict[str, np.ndarray]:
    """{name: host array} of a pytree of nested dicts, names joined with `sep`."""
    flat = traverse_util.flatten_dict(model)
    for path, leaf in flat.items():
        if not all(isinstance(k, str) and sep not in k for k in path) or not hasattr(leaf, "shape"):
            raise ValueError(f"leaf {path}: only nested dicts of arrays with string keys free of {sep!r} "
                             "map to safetensors names")
    return {sep.join(path): np.asarray(leaf) for path, leaf in flat.items()}


def unflatten(flat: dict, sep: str = "/") -> dict:
    """Nested dicts from {name: array}, splitting names on `sep`."""
    names = sorted(flat)
    for shorter, longer in zip(names, names[1:]):
        if longer.startswith(shorter + sep):
            raise ValueError(f"tensor name {shorter!r} is both a tensor and a prefix of others")
    return traverse_util.unflatten_dict(flat, sep=sep)


def _files(path: str) -> list[str]:
    """The safetensors files of a checkpoint file or directory."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no safetensors checkpoint at {path}")
    if os.path.isfile(os.path.join(path, INDEX)) and os.path.isfile(os.path.join(path, SINGLE)):
        raise ValueError(f"{path} holds both {INDEX} and {SINGLE}: two checkpoints, one of them stale; remove the "
                         "one that is not the model")
    if os.path.isfile(os.path.join(path, INDEX)):
        with open(os.path.join(path, INDEX)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not shards:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return [os.path.join(path, s) for s in shards]


def load_flat(path: str) -> dict[str, np.ndarray]:
    """{tensor name: host array} of a checkpoint file or directory of shards."""
    flat = {}
    for file in _files(path):
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                if name in flat:
                    raise ValueError(f"tensor {name!r} appears in more than one shard of {path}")
                flat[name] = f.get_tensor(name)
    return flat


def load(path: str, sep: str = "/") -> dict:
    """A checkpoint file or directory of shards -> nested dict of NumPy arrays."""
    return unflatten(load_flat(path), sep)


def save(model, path: str, sep: str = "/", max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> None:
    """Write `model` to `path`: one file if it ends in .safetensors, else a directory
    holding `model.safetensors`, or shards of at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own) and their index json; the directory's
    other .safetensors files and index (an earlier save's) are removed."""
    save_flat(flatten(model, sep), path, max_shard_bytes, metadata)


def save_flat(tensors: dict, path: str, max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> None:
    """`save` of {tensor name: array} as named."""
    flat = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {"format": "np", **(metadata or {})}
    if path.endswith(".safetensors"):
        save_file(flat, path, metadata=metadata)
        return
    shards, size = [[]], 0
    for name, x in flat.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += x.nbytes
    os.makedirs(path, exist_ok=True)
    if len(shards) == 1:
        save_file(flat, os.path.join(path, SINGLE), metadata=metadata)
        _remove_others(path, [SINGLE])
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: flat[n] for n in names}, os.path.join(path, file), metadata=metadata)
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": sum(x.nbytes for x in flat.values())}, "weight_map": weight_map}
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f, indent=1)
    _remove_others(path, [INDEX, *weight_map.values()])


def _remove_others(path: str, written: list[str]) -> None:
    """Remove the .safetensors files and index in `path` that this save did not write
    (an earlier checkpoint's, which a load would otherwise read or prefer)."""
    for name in os.listdir(path):
        if (name.endswith(".safetensors") or name == INDEX) and name not in written:
            os.remove(os.path.join(path, name))


def split_vocab(a, b, vocab_sizes: tuple[int, int]):
    """Cut two models to their shared vocabulary rows, for merging.

    The rule: leaves of one name must have the same shape, except that they may differ
    along exactly one axis where their sizes are the two vocabulary sizes
    `vocab_sizes` = (V_a, V_b) (e.g. (32000, 32001): embedding rows, output columns and
    bias). Rows 0..min(V_a, V_b)-1 along that axis are shared and are what gets
    merged; the extra rows exist in one model only and are taken from it, unchanged,
    by `join_vocab`. Any other mismatch (names, number of axes, sizes) is a
    ValueError naming the leaf.

    Returns:
      (a_shared, b_shared, extra): the cut models (same structure and shapes) and
      {leaf name: (axis, extra rows)} for `join_vocab`.
    """
    la, lb = flatten(a), flatten(b)
    if la.keys() != lb.keys():
        only = sorted(la.keys() ^ lb.keys())
        raise ValueError(f"the models have different tensors; present in one only: {only[:5]}")
    shared, extra = min(vocab_sizes), {}
    for name in la:
        x, y = la[name], lb[name]
        if x.shape == y.shape:
            continue
        axes = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n] if x.ndim == y.ndim else []
        if len(axes) != 1 or (x.shape[axes[0]], y.shape[axes[0]]) != tuple(vocab_sizes):
            raise ValueError(f"leaf {name!r}: shapes {x.shape} and {y.shape} differ other than in one axis of "
                             f"vocabulary sizes {tuple(vocab_sizes)}")
        axis = axes[0]
        longer = x if x.shape[axis] > y.shape[axis] else y
        extra[name] = (axis, np.take(longer, np.arange(shared, longer.shape[axis]), axis=axis))
        la[name], lb[name] = (np.take(z, np.arange(shared), axis=axis) for z in (x, y))
    return unflatten(la), unflatten(lb), extra


def join_vocab(merged, extra: dict):
    """`merged` (cut by `split_vocab`) with the extra vocabulary rows appended back."""
    flat = flatten(merged)
    for name, (axis, rows) in extra.items():
        if name not in flat:
            raise ValueError(f"leaf {name!r} of the extra rows is not in the merged model")
        flat[name] = np.concatenate([flat[name], rows.astype(flat[name].dtype)], axis=axis)
    return unflatten(flat)

