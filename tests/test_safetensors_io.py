import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from m2n2_jax import merge_ops
from m2n2_jax.safetensors_io import flatten, join_vocab, load, save, split_vocab, unflatten


def tiny_checkpoint(rng, vocab=12, d=4):
    """A flax-like params tree: embedding (vocab, d), a layer, output kernel (d, vocab) and bias."""
    return {
        "embed": {"embedding": rng.normal(size=(vocab, d)).astype(np.float32)},
        "layer_0": {"mlp": {"kernel": rng.normal(size=(d, 3)).astype(ml_dtypes.bfloat16),
                            "bias": np.arange(3, dtype=np.float32)}},
        "out": {"kernel": rng.normal(size=(d, vocab)).astype(np.float32),
                "bias": rng.normal(size=(vocab,)).astype(np.float32)},
    }


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_flat_names_round_trip(rng):
    params = tiny_checkpoint(rng)
    flat = flatten(params)
    assert sorted(flat) == ["embed/embedding", "layer_0/mlp/bias", "layer_0/mlp/kernel", "out/bias", "out/kernel"]
    assert_same(unflatten(flat), params)
    assert_same(unflatten(flatten(params, sep="."), sep="."), params)


def test_single_file_round_trip(tmp_path, rng):
    params = tiny_checkpoint(rng)
    save(params, str(tmp_path / "m.safetensors"))
    assert_same(load(str(tmp_path / "m.safetensors")), params)
    save(params, str(tmp_path / "dir"))  # a directory with one file: model.safetensors
    assert os.listdir(tmp_path / "dir") == ["model.safetensors"]
    assert_same(load(str(tmp_path / "dir")), params)


def test_sharded_round_trip_with_index(tmp_path, rng):
    params = tiny_checkpoint(rng)
    save(params, str(tmp_path), max_shard_bytes=100)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(flatten(params)) and set(index["weight_map"].values()) == set(shards)
    assert_same(load(str(tmp_path)), params)
    # Without the index json, every shard of the directory is read.
    os.remove(tmp_path / "model.safetensors.index.json")
    assert_same(load(str(tmp_path)), params)


def test_a_directory_holds_one_checkpoint(tmp_path, rng):
    """Saving into a directory replaces the safetensors files and index of a previous
    save whole (sharded -> one file -> sharded); files of other kinds stay."""
    a, b = tiny_checkpoint(rng), tiny_checkpoint(rng)
    (tmp_path / "README.md").write_text("kept")
    (tmp_path / "adapter.safetensors").write_bytes(b"stale")
    save(a, str(tmp_path), max_shard_bytes=100)
    save(b, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["README.md", "model.safetensors"]
    assert_same(load(str(tmp_path)), b)
    save(a, str(tmp_path), max_shard_bytes=100)
    assert "model.safetensors" not in os.listdir(tmp_path)
    assert_same(load(str(tmp_path)), a)


def test_an_index_beside_a_single_file_is_refused(tmp_path, rng):
    save(tiny_checkpoint(rng), str(tmp_path), max_shard_bytes=100)
    save(tiny_checkpoint(rng), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{tmp_path} holds both model.safetensors.index.json and "
                                         "model.safetensors"):
        load(str(tmp_path))


def test_loaded_checkpoints_merge_and_write_back(tmp_path, rng):
    a, b = tiny_checkpoint(rng), tiny_checkpoint(rng)
    save(a, str(tmp_path / "a.safetensors"))
    save(b, str(tmp_path / "b"), max_shard_bytes=64)
    merged = merge_ops.linear([load(str(tmp_path / "a.safetensors")), load(str(tmp_path / "b"))], [0.75, 0.25])
    save(jax.tree.map(np.asarray, merged), str(tmp_path / "merged"))
    out = load(str(tmp_path / "merged"))
    expected = 0.75 * a["out"]["kernel"] + 0.25 * b["out"]["kernel"]
    np.testing.assert_allclose(out["out"]["kernel"], expected, rtol=1e-6)
    assert out["layer_0"]["mlp"]["kernel"].dtype == ml_dtypes.bfloat16


def test_vocab_mismatch_merges_shared_rows_and_keeps_extra_ones(rng):
    a, b = tiny_checkpoint(rng, vocab=12), tiny_checkpoint(rng, vocab=13)  # b has one added token
    a_cut, b_cut, extra = split_vocab(a, b, vocab_sizes=(12, 13))
    assert a_cut["embed"]["embedding"].shape == b_cut["embed"]["embedding"].shape == (12, 4)
    assert b_cut["out"]["kernel"].shape == (4, 12) and b_cut["out"]["bias"].shape == (12,)
    merged = join_vocab(jax.tree.map(np.asarray, merge_ops.linear([a_cut, b_cut], [0.5, 0.5])), extra)
    assert {k: v.shape for k, v in flatten(merged).items()} == {k: v.shape for k, v in flatten(b).items()}
    # NumPy reference: shared rows averaged, the extra row (index 12) copied from b.
    emb = merged["embed"]["embedding"]
    np.testing.assert_allclose(emb[:12], 0.5 * (a["embed"]["embedding"] + b["embed"]["embedding"][:12]), rtol=1e-6)
    np.testing.assert_array_equal(emb[12], b["embed"]["embedding"][12])
    np.testing.assert_array_equal(merged["out"]["kernel"][:, 12], b["out"]["kernel"][:, 12])
    np.testing.assert_array_equal(merged["out"]["bias"][12], b["out"]["bias"][12])
    # Either order: the extra rows come from whichever model has them.
    _, _, extra_ba = split_vocab(b, a, vocab_sizes=(13, 12))
    np.testing.assert_array_equal(extra_ba["embed/embedding"][1], b["embed"]["embedding"][12:])


def test_other_shape_mismatches_name_the_leaf(rng):
    a = tiny_checkpoint(rng)
    b = tiny_checkpoint(rng)
    b["layer_0"]["mlp"]["kernel"] = b["layer_0"]["mlp"]["kernel"][:, :2]
    with pytest.raises(ValueError, match="'layer_0/mlp/kernel'"):
        split_vocab(a, b, vocab_sizes=(12, 13))
    c = tiny_checkpoint(rng, vocab=13, d=5)  # hidden size differs too: two axes of the output kernel
    with pytest.raises(ValueError, match="'embed/embedding'"):
        split_vocab(a, c, vocab_sizes=(12, 13))
    d = tiny_checkpoint(rng, vocab=14)  # not the stated vocabulary sizes
    with pytest.raises(ValueError, match=r"'embed/embedding'.*\(12, 13\)"):
        split_vocab(a, d, vocab_sizes=(12, 13))
    e = tiny_checkpoint(rng)
    del e["out"]["bias"]
    with pytest.raises(ValueError, match="out/bias"):
        split_vocab(a, e, vocab_sizes=(12, 12))


def test_jax_arrays_are_saved_too(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2, jnp.bfloat16)}
    save(params, str(tmp_path / "j.safetensors"))
    assert_same(load(str(tmp_path / "j.safetensors")), jax.tree.map(np.asarray, params))


def test_names_that_cannot_round_trip_are_refused():
    with pytest.raises(ValueError, match="string keys"):
        flatten({"a/b": np.zeros(2)})  # the separator inside a key
    with pytest.raises(ValueError, match="string keys"):
        flatten({"a": [np.zeros(2)]})  # a list is not a named tensor
    with pytest.raises(ValueError, match="both a tensor and a prefix"):
        unflatten({"a": np.zeros(2), "a/b": np.zeros(2)})
