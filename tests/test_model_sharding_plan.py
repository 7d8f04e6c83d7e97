"""benchmarks/model_sharding.py: the Llama shapes of a config, its forward pass, a
plan on the suite's two devices, and the recorded plans' contract."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import m2n2_jax as mj
from benchmarks import model_sharding as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 1, "vocab_size": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_theta": 1e5}


def test_llama_2_7b_config_gives_its_6_74b_parameters():
    model = bench.llama_shapes(json.load(open(bench.LLAMA_2_7B)), jnp.bfloat16)
    assert mj.num_params(model) == 6_738_415_616
    assert model["layers"][0]["down_proj"].shape == (4096, 11008) and len(model["layers"]) == 32


def test_llama_forward_is_causal_and_scores_are_probabilities():
    shapes = bench.llama_shapes(TINY, jnp.float32)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, TINY["vocab_size"])
    scores = np.asarray(jax.jit(bench.llama_score_fn(TINY))(params, tokens))
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
    # Changing the last token changes the last position's logits only (without the
    # causal mask every position would see it).
    logits = jax.jit(bench.llama_logits(TINY))
    other = tokens.at[:, -1].set((tokens[:, -1] + 1) % TINY["vocab_size"])
    a, b = np.asarray(logits(params, tokens)), np.asarray(logits(params, other))
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    assert np.abs(a[:, -1] - b[:, -1]).max() > 1e-3


def test_a_plan_on_a_model_axis_of_two_halves_the_archive():
    shapes = bench.llama_shapes(TINY, jnp.bfloat16)
    data = jax.ShapeDtypeStruct((8, 12), jnp.int32)
    plan = lambda m, memory: mj.memory_plan(
        mj.M2N2(archive_size=6, mutation=False), bench.llama_score_fn(TINY), shapes, data, num_seeds=2,
        mesh=Mesh(np.array(jax.devices()[:m]).reshape(1, 1, m), ("runs", "data", "model")), archive_memory=memory,
        chunk_size=4)
    archive = 6 * mj.num_params(shapes) * 2
    one, two, host = plan(1, "device"), plan(2, "device"), plan(1, "pinned_host")
    assert archive <= one["argument_bytes"] < 1.05 * archive
    # The tiny model's vectors (norms) stay whole: a little over half.
    assert 0.5 * archive <= two["argument_bytes"] < 0.56 * archive
    assert host["host_bytes"] == archive and host["argument_bytes"] < 0.05 * archive


def test_the_recorded_plans_keep_their_contract():
    recorded = json.load(open(os.path.join(ROOT, "benchmarks", "results", "model_sharding.json")))
    fields = {"argument_bytes", "temp_bytes", "host_bytes"}
    assert set(recorded["by_model_axis"]) == {"1", "2", "4", "8"}
    assert all(fields <= set(v) for v in recorded["by_model_axis"].values())
    axis = recorded["by_model_axis"]
    assert axis["8"]["argument_bytes"] <= 0.15 * axis["1"]["argument_bytes"]
    assert len(recorded["plans"]) >= 2
    for plan in recorded["plans"].values():
        assert fields | {"fits"} <= set(plan) and isinstance(plan["fits"], bool)


@pytest.fixture(autouse=True)
def _no_flags_leak():
    """Importing the benchmark must not change XLA_FLAGS for later subprocesses."""
    before = os.environ.get("XLA_FLAGS")
    yield
    assert os.environ.get("XLA_FLAGS") == before
