"""Memory plans: per-device bytes of one M2N2 step, compiled from abstract shapes.

    python -m benchmarks.model_sharding --config benchmarks/fixtures/llama-2-7b/config.json \\
        --archive 15 --dtype bfloat16 --mesh 1,1,8 --archive-memory device --capacity-gb 80
    python -m benchmarks.model_sharding --record      # the recorded set -> benchmarks/results/model_sharding.json

One plan compiles `run`'s step (`mj.memory_plan`: the archive, two parents merged, the
child scored on a chunk of datapoints, the state updated in place) for a Hugging Face
Llama `config.json` or the digits MLP, on a mesh of this machine's devices (8 CPU
devices are forced when jax starts here), and prints XLA's per-device accounting:
arguments (the state and data), temporaries (parents, child, activations) and host
memory (an archive kept there). No weight is loaded or allocated. The Llama's score is
the mean probability of a sequence's tokens under teacher forcing (a forward pass; the
paper's GSM8K score generates text, whose KV cache is noted in docs/scale.md). XLA:CPU
plans for CPU devices: a GPU compiles other fusions and temporaries, so the numbers
are an estimate of a GPU's; the arguments (the archive) are exact.

--record: the digits MLP scaled to ~1e8 parameters (64 -> 10,000 -> 10,000 -> 10, an
archive of 20 float32 models) at model axis 1, 2, 4 and 8, and the Llama-2-7B plans of
docs/scale.md (archive 15, bfloat16): one 141 GB GPU with the archive on the host, and
8 x 80 GB GPUs sharded.
"""

from __future__ import annotations

import os

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import datetime
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import m2n2_jax as mj
from m2n2_jax.tasks import digits

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_2_7B = os.path.join(HERE, "fixtures", "llama-2-7b", "config.json")
DIGITS_WIDTHS = (64, 10_000, 10_000, 10)
GIB = 2**30


def llama_shapes(config: dict, dtype) -> dict:
    """The parameter shapes of a Llama `config.json`, HF layout ((out, in) matrices)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = config.get("head_dim", h // heads)
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    layer = {"q_proj": s(heads * d, h), "k_proj": s(kv * d, h), "v_proj": s(kv * d, h), "o_proj": s(h, heads * d),
             "gate_proj": s(f, h), "up_proj": s(f, h), "down_proj": s(h, f),
             "input_layernorm": s(h), "post_attention_layernorm": s(h)}
    model = {"embed_tokens": s(v, h), "layers": [dict(layer) for _ in range(config["num_hidden_layers"])],
             "norm": s(h)}
    if not config.get("tie_word_embeddings", False):
        model["lm_head"] = s(v, h)
    return model


def llama_logits(config: dict):
    """(params, tokens (B, T) int32) -> (B, T, V) float32 next-token logits: a
    plain-jnp Llama forward (RMSNorm, RoPE, grouped-query attention, SwiGLU, causal),
    computed in the parameters' dtype."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    d = config.get("head_dim", h // heads)
    eps, theta = config.get("rms_norm_eps", 1e-6), config.get("rope_theta", 10_000.0)

    def norm(x, w):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)).astype(x.dtype) * w

    def rope(x, positions):  # x (B, T, n, d)
        freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
        angle = positions[:, None] * freq[None]
        cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
        x1, x2 = x[..., : d // 2].astype(jnp.float32), x[..., d // 2:].astype(jnp.float32)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)

    def logits_fn(params, tokens):
        b, t = tokens.shape
        positions = jnp.arange(t, dtype=jnp.float32)
        x = params["embed_tokens"][tokens]
        mask = jnp.tril(jnp.ones((t, t), bool))
        for p in params["layers"]:
            y = norm(x, p["input_layernorm"])
            q = rope((y @ p["q_proj"].T).reshape(b, t, heads, d), positions)
            k = rope((y @ p["k_proj"].T).reshape(b, t, kv, d), positions)
            v = (y @ p["v_proj"].T).reshape(b, t, kv, d)
            k, v = jnp.repeat(k, heads // kv, axis=2), jnp.repeat(v, heads // kv, axis=2)
            logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / np.sqrt(d)
            attention = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), -1).astype(x.dtype)
            x = x + jnp.einsum("bnqk,bknd->bqnd", attention, v).reshape(b, t, heads * d) @ p["o_proj"].T
            y = norm(x, p["post_attention_layernorm"])
            x = x + (jax.nn.silu(y @ p["gate_proj"].T) * (y @ p["up_proj"].T)) @ p["down_proj"].T
        head = params.get("lm_head", params["embed_tokens"])
        return (norm(x, params["norm"]) @ head.T).astype(jnp.float32)

    return logits_fn


def llama_score_fn(config: dict):
    """(params, tokens (B, T)) -> (B,) mean probability of tokens 1 .. T-1 given the
    previous ones (softmax in float32)."""
    logits_fn = llama_logits(config)

    def score_fn(params, tokens):
        logp = jax.nn.log_softmax(logits_fn(params, tokens), -1)
        taken = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
        return jnp.exp(taken).mean(-1)

    return score_fn


def digits_plan(m: int, archive: int = 20) -> dict:
    """The digits MLP of DIGITS_WIDTHS, float32, on a (1, 1, m) mesh."""
    sizes = DIGITS_WIDTHS
    model = jax.eval_shape(lambda: digits.mlp_from_flat(
        jnp.zeros(sum(a * b + b for a, b in zip(sizes, sizes[1:]))), sizes))
    data = (jax.ShapeDtypeStruct((1437, sizes[0]), jnp.float32), jax.ShapeDtypeStruct((1437,), jnp.int32))

    def score_fn(params, batch):
        x, y = batch
        return (jnp.argmax(digits.mlp_apply(params, x), -1) == y).astype(jnp.float32)

    mesh = jax.make_mesh((1, 1, m), ("runs", "data", "model"), devices=jax.devices()[:m])
    plan = mj.memory_plan(mj.M2N2(archive_size=archive), score_fn, model, data, num_seeds=archive, mesh=mesh,
                          chunk_size=256)
    return {**plan, "parameters": mj.num_params(model)}


def llama_plan(config: dict, *, archive: int, dtype: str, mesh_shape: tuple[int, int, int], archive_memory: str,
               capacity_gb: float, points: int, seq_len: int, chunk: int, recipes: int | None = None) -> dict:
    """One plan for a Llama config: M2N2 merging two pre-trained models (no mutation);
    with `recipes`, a recipe archive with room for that many children."""
    model = llama_shapes(config, jnp.dtype(dtype))
    data = jax.ShapeDtypeStruct((points, seq_len), jnp.int32)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = jax.make_mesh(mesh_shape, ("runs", "data", "model"), devices=devices)
    t0 = time.perf_counter()
    algorithm = mj.M2N2(archive_size=archive, mutation=False) if recipes is None else mj.M2N2(
        archive_size=archive, mutation=False, archive="recipes", max_children=recipes)
    plan = mj.memory_plan(algorithm, llama_score_fn(config), model, data,
                          num_seeds=2, mesh=mesh, archive_memory=archive_memory, chunk_size=chunk)
    device = plan["argument_bytes"] + plan["temp_bytes"]
    # XLA:CPU computes a bfloat16 select and slot update in float32 (float
    # normalization), so its temporaries hold one more copy of the archive's leaves
    # (docs/scale.md); GPUs select and update bfloat16 natively. Other temporaries
    # share that buffer, so subtracting it gives a lower bound, not the working set.
    copy = archive * mj.num_params(model) * jnp.dtype(dtype).itemsize // mesh_shape[2] \
        if jnp.dtype(dtype).itemsize == 2 and recipes is None else 0
    return {**plan, "device_bytes": device, "device_capacity_bytes": int(capacity_gb * 1e9),
            "fits": bool(device <= capacity_gb * 1e9), "cpu_archive_copy_bytes": copy,
            "device_bytes_without_cpu_archive_copy": device - copy,  # a lower bound
            "fits_without_cpu_archive_copy": bool(device - copy <= capacity_gb * 1e9),
            "parameters": mj.num_params(model),
            "model_bytes": mj.num_params(model) * jnp.dtype(dtype).itemsize, "archive_size": archive,
            "dtype": dtype, "mesh": dict(zip(("runs", "data", "model"), mesh_shape)), "archive_memory": archive_memory,
            "archive": "models" if recipes is None else f"recipes (max_children {recipes})",
            "fitness_points": points, "sequence_length": seq_len, "chunk_size": chunk,
            "compile_seconds": round(time.perf_counter() - t0, 1)}


def show(name: str, plan: dict) -> str:
    cells = [f"{k} {plan[k] / GIB:.2f} GiB" for k in ("argument_bytes", "temp_bytes", "host_bytes")]
    fits = "" if "fits" not in plan else (
        f", fits {plan['device_capacity_bytes'] / 1e9:.0f} GB: {plan['fits']} (without XLA:CPU's archive copy "
        f"{plan['device_bytes_without_cpu_archive_copy'] / GIB:.2f} GiB: {plan['fits_without_cpu_archive_copy']})")
    return f"{name}: per device " + ", ".join(cells) + fits


LLAMA_PLANS = {
    "llama-2-7b, archive 15, bf16: 1 x 141 GB GPU, archive on the host": dict(
        mesh_shape=(1, 1, 1), archive_memory="pinned_host", capacity_gb=141, dtype="bfloat16"),
    "llama-2-7b, archive 15, bf16: 8 x 80 GB GPUs, model axis 8": dict(
        mesh_shape=(1, 1, 8), archive_memory="device", capacity_gb=80, dtype="bfloat16"),
    # float32 is updated in place on XLA:CPU: its temporaries are the step's working set.
    "llama-2-7b, archive 15, float32: 1 device, archive on the host (working set without the bf16 copy)": dict(
        mesh_shape=(1, 1, 1), archive_memory="pinned_host", capacity_gb=141, dtype="float32"),
}


def record(out: str, args) -> None:
    config = json.load(open(LLAMA_2_7B))
    by_axis = {}
    for m in (1, 2, 4, 8):
        plan = digits_plan(m)
        by_axis[str(m)] = {k: plan[k] for k in ("argument_bytes", "temp_bytes", "host_bytes")}
        print(show(f"digits MLP ({plan['parameters']:,} parameters), model axis {m}", plan), flush=True)
    plans = {}
    for name, kw in LLAMA_PLANS.items():
        plans[name] = llama_plan(config, archive=15, points=args.points, seq_len=args.seq_len, chunk=args.chunk,
                                 **kw)
        print(show(name, plans[name]), flush=True)
    ratio = by_axis["8"]["argument_bytes"] / by_axis["1"]["argument_bytes"]
    result = {
        "command": "python -m benchmarks.model_sharding --record",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, 8 XLA:CPU devices forced; jax {jax.__version__}",
        "digits_mlp": {"widths": list(DIGITS_WIDTHS), "parameters": plan["parameters"], "dtype": "float32",
                       "archive_size": 20, "algorithm": "M2N2 (archive 20, mutation on)"},
        "by_model_axis": by_axis,
        "argument_bytes_axis_8_over_axis_1": ratio,
        "plans": plans,
        "note": "per-device bytes from XLA:CPU's memory_analysis of one compiled step (arguments, temporaries) "
                "and the host-memory arguments; fits compares arguments + temporaries with the device capacity",
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"model axis 8 / 1, argument bytes per device: {ratio:.3f}; wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=LLAMA_2_7B, help="a Hugging Face Llama config.json")
    parser.add_argument("--archive", type=int, default=15, help="archive size N")
    parser.add_argument("--dtype", default="bfloat16", help="parameter dtype")
    parser.add_argument("--mesh", default="1,1,8", help="runs,data,model (at most 8 devices here)")
    parser.add_argument("--archive-memory", default="device", choices=("device", "pinned_host"))
    parser.add_argument("--capacity-gb", type=float, default=80.0, help="device memory to compare with")
    parser.add_argument("--points", type=int, default=1319, help="fitness datapoints (GSM8K's fitness set: 1,319)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per datapoint")
    parser.add_argument("--chunk", type=int, default=8, help="datapoints scored at a time (chunk_size)")
    parser.add_argument("--record", action="store_true", help="the recorded set, to --out")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "model_sharding.json"))
    args = parser.parse_args(argv)
    if args.record:
        record(args.out, args)
        return
    mesh = tuple(int(x) for x in args.mesh.split(","))
    if len(mesh) != 3 or np.prod(mesh) > len(jax.devices()):
        raise SystemExit(f"--mesh must be runs,data,model on at most {len(jax.devices())} devices, got {args.mesh}")
    plan = llama_plan(json.load(open(args.config)), archive=args.archive, dtype=args.dtype, mesh_shape=mesh,
                      archive_memory=args.archive_memory, capacity_gb=args.capacity_gb, points=args.points,
                      seq_len=args.seq_len, chunk=args.chunk)
    print(show(os.path.basename(os.path.dirname(os.path.abspath(args.config))), plan))
    print(json.dumps(plan, indent=1))


if __name__ == "__main__":
    main()
