"""`m2n2-merge CONFIG.yaml`: merge Llama-family checkpoints with a method of the menu.

    m2n2-merge merge.yaml           # run (resumed from `checkpoint` when it holds one)
    m2n2-merge merge.yaml --plan    # the per-device memory of one step; no weight is loaded

The config is a YAML mapping (PyYAML, the `llm` extra). Relative paths are read from
the config file's folder. Every key is checked, and the models' configs, tokenizer
and data rows read, before any weight is loaded; a bad, unknown or missing key is
refused naming it. Keys:

  models            list of >= 2 Hugging Face Llama folders or GGUF files, one
                    architecture (required). The first seed's tokenizer reads the data;
                    its special tokens (eos/pad: generation_config.json, then
                    config.json; a GGUF file's metadata) end and pad generations.
  task              mapping (required):
    kind            exact_match | choice | nll | gsm8k (`m2n2_jax.llm.scores`)
    data            a JSONL file: exact_match {"prompt", "answer"}; choice {"prompt",
                    "choices", "answer": index}; nll {"text"}; gsm8k {"question", "answer"}
    fitness         rows the search scores models on: the file's first rows
    test            rows scored once at the end: the next ones (disjoint)
    template        optional: a str.format string over a row's fields, the text the
                    model reads (default: "{prompt}", "{prompt}", "{text}", "{question}")
  evaluations       the budget in model evaluations, the seeds' included (required)
  output            folder of the merged model, report.json, curves.png, recipe.json (required)
  method            a name of `m2n2_jax.ALGORITHMS` (default m2n2):
                    m2n2: whole parameter vectors, no mutation (the paper's LLM setting);
                    map-elites: a b x b grid, b = floor(sqrt(archive_size)), over the mean
                    score on the first and the second half of the fitness rows;
                    slerp-grid: `evaluations` ratios between exactly 2 models;
                    evosax-es: Sep-CMA-ES over every parameter (evosax: the experiments extra);
                    merge-es: CMA-ES over one coefficient per layer (embedding, each
                    layer, norm, head) of `operator` (evosax);
                    random-search: Gaussian steps (std 0.01) from the best seed
  archive_size      m2n2 (default 15, the paper's), map-elites (default 16)
  archive           m2n2: recipes (default; the archive as coefficients over the
                    seeds, docs/recipes.md) or models (every slot a whole model)
  warmup            m2n2: the first children merge random archive members (default 0;
                    the paper: at most 50)
  population        evosax-es (default 20), merge-es (25), random-search (4)
  operator          merge-es: a name of `m2n2_jax.merge_ops.OPERATORS` but linear
                    (default slerp, 2 models; the others merge models[1:] on models[0])
  checkpoint        optional folder: the run is saved there and resumed when it holds one
  checkpoint_every  evaluations between checkpoints (default evaluations // 50, at least 1)
  time_limit        optional seconds: stop after the evaluation that passes it (the
                    output then holds the best model so far; rerun to resume)
  dtype             float32 (default) or bfloat16: the weights and the computation
  mesh              optional [data, model]: devices splitting the rows and each model
  archive_memory    device (default) or pinned_host (the archive in host memory)
  seed              the run's PRNG seed (default 0)
  max_new_tokens    gsm8k: tokens generated per question (default 256); exact_match
                    generates the longest answer's tokens and a stop token
  batch_size        rows scored at once (default 16)

What `output` holds: the merged model (config.json, safetensors, the first seed's
tokenizer and generation config when it is a Hugging Face folder, a tokenizer.json
built from a GGUF seed, README.md: the model card), report.json (settings, each
seed's and the merged model's fitness and test score, the curve, wall time, machine),
curves.png (with matplotlib) and, with the recipe archive, recipe.json
(`m2n2_jax.recipes.to_json` of the returned slot: the merge remade from the seeds
without a search). Ctrl-C stops the run; with `checkpoint` the latest checkpoint
resumes it. docs/llm_merge.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import m2n2_jax as mj
from m2n2_jax import merge_ops, recipes
from m2n2_jax.llm import gguf, hf, llama, scores

REQUIRED = ("models", "task", "evaluations", "output")
TASK_KEYS = ("kind", "data", "fitness", "test", "template")
METHOD_KEYS = {  # the keys each method takes, with their defaults
    "m2n2": {"archive_size": 15, "archive": "recipes", "warmup": 0},
    "map-elites": {"archive_size": 16},
    "slerp-grid": {},
    "evosax-es": {"population": 20},
    "merge-es": {"population": 25, "operator": "slerp"},
    "random-search": {"population": 4},
}
OPTIONAL = {"method": "m2n2", "checkpoint": None, "checkpoint_every": None, "time_limit": None, "dtype": "float32",
            "mesh": None, "archive_memory": "device", "seed": 0, "max_new_tokens": None, "batch_size": 16}
OPTIONS = ("archive_size", "archive", "warmup", "population", "operator")
KEYS = REQUIRED + tuple(OPTIONAL) + OPTIONS
STOP_NAMES = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Config:
    """A checked config: paths absolute, every default filled in."""

    models: tuple[str, ...]
    kind: str
    data: str
    fitness: int
    test: int
    template: str
    evaluations: int
    output: str
    method: str
    options: dict  # the method's own keys (METHOD_KEYS), defaults filled in
    checkpoint: str | None
    checkpoint_every: int
    time_limit: float | None
    dtype: str
    mesh: tuple[int, int] | None
    archive_memory: str
    seed: int
    max_new_tokens: int | None  # gsm8k's
    batch_size: int

    def settings(self) -> dict:
        """The config as report.json and the model card list it."""
        task = {k: getattr(self, k) for k in ("kind", "data", "fitness", "test", "template")}
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in task and f.name != "options"}
        return {**rest, "task": task, **self.options}


def _fail(key: str, what: str, value) -> ValueError:
    return ValueError(f"config key {key!r} must be {what}, got {value!r}")


def _int(raw: dict, key: str, low: int = 1, default=None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(key, "a positive int" if low == 1 else f"an int >= {low}", value)
    return value


def _choice(raw: dict, key: str, choices, default=None) -> str:
    value = raw.get(key, default)
    if value not in choices:
        raise _fail(key, f"one of {', '.join(choices)}", value)
    return value


def _path(raw: dict, key: str, base: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(key, "a path (a non-empty string)", value)
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def validate(raw, base: str = ".") -> Config:
    """A `Config` of a YAML mapping, or a ValueError naming the first bad key; paths
    are read from `base`. Nothing but the mapping is read."""
    if not isinstance(raw, dict):
        raise ValueError(f"the config must be a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KEYS), key=str)
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"config key {missing[0]!r} is missing (required: {', '.join(REQUIRED)})")
    method = _choice(raw, "method", tuple(mj.ALGORITHMS), OPTIONAL["method"])
    options = _method_options(raw, method)
    models = _models(raw, base)
    if method == "slerp-grid" and len(models) != 2:
        raise _fail("models", "2 checkpoints for slerp-grid", raw["models"])
    task = _task(raw, base)
    checkpoint = _path(raw, "checkpoint", base) if raw.get("checkpoint") is not None else None
    evaluations = _evaluations(raw, len(models), options.get("population", 1))
    output = _path(raw, "output", base)
    _check_output(output, models, checkpoint)
    return Config(
        models=models, **task, evaluations=evaluations, output=output, method=method, options=options,
        checkpoint=checkpoint, checkpoint_every=_checkpoint_every(raw, checkpoint, evaluations),
        time_limit=_time_limit(raw), dtype=_choice(raw, "dtype", ("float32", "bfloat16"), OPTIONAL["dtype"]),
        mesh=_mesh(raw), archive_memory=_choice(raw, "archive_memory", ("device", "pinned_host"), "device"),
        seed=_int(raw, "seed", 0, 0), max_new_tokens=_max_new_tokens(raw, task["kind"]),
        batch_size=_int(raw, "batch_size", 1, OPTIONAL["batch_size"]))


def _evaluations(raw: dict, num_seeds: int, population: int) -> int:
    """The budget: at least the seeds and one step of `population` children."""
    value = _int(raw, "evaluations")
    if value < num_seeds + population:
        raise _fail("evaluations", f">= {num_seeds + population} (the {num_seeds} seeds and one step of "
                                   f"{population})", value)
    return value


def _method_options(raw: dict, method: str) -> dict:
    """The method's own keys (defaults filled in); a key of another method is refused."""
    defaults = METHOD_KEYS[method]
    for key in OPTIONS:
        if key in raw and key not in defaults:
            users = ", ".join(m for m, keys in METHOD_KEYS.items() if key in keys)
            raise ValueError(f"config key {key!r} does not apply to method {method!r} (it applies to {users})")
    options = {**defaults, **{k: raw[k] for k in defaults if k in raw}}
    if "archive_size" in options:
        _int(options, "archive_size", 2)
    if "warmup" in options:
        _int(options, "warmup", 0)
    if "population" in options:
        _int(options, "population", 2 if method != "random-search" else 1)
    if "archive" in options:
        _choice(options, "archive", ("recipes", "models"))
    if "operator" in options:
        _choice(options, "operator", tuple(op for op in merge_ops.OPERATORS if op != "linear"))
    return options


def _models(raw: dict, base: str) -> tuple[str, ...]:
    models = raw["models"]
    if not isinstance(models, list) or len(models) < 2:
        raise _fail("models", "a list of at least 2 checkpoints (Hugging Face folders or GGUF files)", models)
    paths = tuple(_path({"models": m}, "models", base) for m in models)
    if len(set(paths)) != len(paths):
        raise _fail("models", "distinct checkpoints", models)
    return paths


def _task(raw: dict, base: str) -> dict:
    task = raw["task"]
    if not isinstance(task, dict):
        raise _fail("task", f"a mapping of {', '.join(TASK_KEYS)}", task)
    unknown = sorted(set(task) - set(TASK_KEYS), key=str)
    missing = [k for k in TASK_KEYS[:4] if k not in task]
    if unknown or missing:
        raise ValueError(f"config key 'task.{(unknown or missing)[0]}' is {'unknown' if unknown else 'missing'} "
                         f"(task takes {', '.join(TASK_KEYS)}; template is optional)")
    task = {f"task.{k}": v for k, v in task.items()}  # errors name the nested key
    kind = _choice(task, "task.kind", scores.KINDS)
    template = task.get("task.template", scores.TEMPLATES[kind])
    if not isinstance(template, str) or not template:
        raise _fail("task.template", "a non-empty str.format string", template)
    return {"kind": kind, "data": _path(task, "task.data", base), "fitness": _int(task, "task.fitness"),
            "test": _int(task, "task.test"), "template": template}


def _check_output(output: str, models, checkpoint) -> None:
    """The output folder is written whole: it must hold no seed and no checkpoint."""
    inside = lambda path, folder: os.path.commonpath([path, folder]) == folder
    if any(inside(m, output) or inside(output, m) for m in models):
        raise ValueError(f"config key 'output' ({output}) must not hold, or be inside, one of the models")
    if checkpoint is not None and (inside(checkpoint, output) or inside(output, checkpoint)):
        raise ValueError(f"config keys 'output' and 'checkpoint' must be separate folders, got {output} and "
                         f"{checkpoint}")


def _checkpoint_every(raw: dict, checkpoint, evaluations: int) -> int:
    if "checkpoint_every" in raw and checkpoint is None:
        raise ValueError("config key 'checkpoint_every' needs 'checkpoint', the folder to save in")
    return _int(raw, "checkpoint_every", 1, max(1, evaluations // 50))


def _time_limit(raw: dict) -> float | None:
    value = raw.get("time_limit")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise _fail("time_limit", "a number of seconds > 0", value)
    return None if value is None else float(value)


def _mesh(raw: dict) -> tuple[int, int] | None:
    value = raw.get("mesh")
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 2 and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)
    if not ok:
        raise _fail("mesh", "[data, model], two device counts >= 1", value)
    if math.prod(value) > len(jax.devices()):
        raise _fail("mesh", f"at most the {len(jax.devices())} devices there are ({math.prod(value)} asked)", value)
    return tuple(value)


def _max_new_tokens(raw: dict, kind: str) -> int | None:
    if kind != "gsm8k":
        if "max_new_tokens" in raw:
            raise ValueError(f"config key 'max_new_tokens' applies to task kind gsm8k only (exact_match generates "
                             f"the longest answer and a stop token), got kind {kind!r}")
        return None
    return _int(raw, "max_new_tokens", 1, 256)


def read_config(path: str) -> Config:
    """`validate` of a YAML file, its relative paths read from its folder."""
    try:
        import yaml
    except ImportError as e:
        raise ImportError("reading a config needs PyYAML: pip install -e '.[llm]'") from e
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    return validate(raw, os.path.dirname(os.path.abspath(path)))


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the run needs besides the weights, read before any is loaded."""

    llama_config: llama.LlamaConfig
    tokenizer: object
    stops: tuple[int, ...]
    pad_id: int
    fitness: tuple  # the task's batch of the fitness rows
    test: tuple


def prepare(config: Config) -> Setup:
    """The seeds' configs (one architecture), the first seed's tokenizer and special
    tokens, the task's fitness and test batches; ValueError naming the key otherwise."""
    configs = [_llama_config(path, i) for i, path in enumerate(config.models)]
    for i, other in enumerate(configs[1:], 1):
        diff = [f.name for f in dataclasses.fields(other)
                if f.compare and getattr(other, f.name) != getattr(configs[0], f.name)]
        if diff:
            raise ValueError(f"config key 'models': models[{i}] is another architecture than models[0] ({diff[0]} "
                             f"{getattr(other, diff[0])!r} vs {getattr(configs[0], diff[0])!r})")
    tokenizer = _tokenizer(config.models[0])
    stops, pad_id = special_tokens(config.models[0], tokenizer, config.kind)
    if not os.path.isfile(config.data):
        raise ValueError(f"config key 'task.data': no file at {config.data}")
    rows = scores.read_rows(config.data, config.kind, config.fitness + config.test)
    try:
        scores.texts(rows, config.template)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"config key 'task.template' ({config.template!r}) does not fit the rows: {e!r}") from e
    encode = lambda part: scores.encode(config.kind, tokenizer, part, config.template, stops, pad_id)
    return Setup(configs[0], tokenizer, stops, pad_id, encode(rows[:config.fitness]), encode(rows[config.fitness:]))


def _tokenizer(path: str):
    """The first seed's tokenizer: its tokenizer.json, or built from its GGUF file."""
    if not path.endswith(".gguf") and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"config key 'models': models[0] ({path}) holds no tokenizer.json (the first seed's "
                         "tokenizer reads the data)")
    return hf.load_tokenizer(path)


def _llama_config(path: str, i: int) -> llama.LlamaConfig:
    """The LlamaConfig of a seed, from its config.json or GGUF metadata (no weight read)."""
    if path.endswith(".gguf") and os.path.isfile(path):
        import gguf as gguf_package

        return gguf.gguf_config(gguf_package.GGUFReader(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"config key 'models': models[{i}] ({path}) is neither a folder holding config.json nor a "
                         f".gguf file")
    try:
        return llama.LlamaConfig.from_json(path)
    except (ValueError, KeyError) as e:
        raise ValueError(f"config key 'models': models[{i}] ({path}): {e}") from e


def special_tokens(path: str, tokenizer, kind: str) -> tuple[tuple[int, ...], int]:
    """(stop ids, pad id) of a seed: eos and pad from generation_config.json, then
    config.json (a GGUF file: its tokenizer metadata); else the tokenizer's usual
    end-of-turn tokens. Generation (exact_match, gsm8k) needs a stop token."""
    found = _gguf_special(path) if path.endswith(".gguf") else _hf_special(path)
    eos, pad = found.get("eos_token_id"), found.get("pad_token_id")
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    stops = stops or [i for i in (tokenizer.token_to_id(n) for n in STOP_NAMES) if i is not None]
    if not stops and kind in ("exact_match", "gsm8k"):
        raise ValueError(f"config key 'models': models[0] ({path}) names no eos_token_id and its tokenizer has "
                         f"none of {', '.join(STOP_NAMES)}: {kind} cannot end a generation")
    return tuple(stops), pad if isinstance(pad, int) else (stops[0] if stops else 0)


def _hf_special(path: str) -> dict:
    found = {}
    for name in ("config.json", "generation_config.json"):  # the generation config wins
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                found.update({k: v for k, v in json.load(f).items()
                              if k in ("eos_token_id", "pad_token_id") and v is not None})
    return found


def _gguf_special(path: str) -> dict:
    import gguf as gguf_package

    fields = gguf_package.GGUFReader(path).fields
    names = {"eos_token_id": "tokenizer.ggml.eos_token_id", "pad_token_id": "tokenizer.ggml.padding_token_id"}
    return {k: int(fields[v].contents()) for k, v in names.items() if v in fields}


def model_shapes(llama_config: llama.LlamaConfig, dtype) -> dict:
    """{"params": ...} of ShapeDtypeStructs: one model's leaves, no weight read."""
    structs = {n: jax.ShapeDtypeStruct(s, dtype) for n, s in hf.expected_shapes(llama_config).items()}
    return hf.from_hf_tensors(llama_config, structs, dtype=None)


def method(config: Config, shapes, num_points: int):
    """(algorithm, params) of the config's method for models shaped like `shapes`."""
    o, name = config.options, config.method
    if name == "m2n2":
        recipe = o["archive"] == "recipes"
        algorithm = mj.M2N2(archive_size=o["archive_size"], mutation=False, archive=o["archive"],
                            capacity_rule="max" if config.kind == "nll" else "fixed",
                            max_children=config.evaluations - len(config.models) if recipe else None)
        return algorithm, algorithm.default_params().replace(warmup=jnp.int32(o["warmup"]))
    if name == "map-elites":
        algorithm = mj.MapElites(bins=max(1, math.isqrt(o["archive_size"])), mutation=False)
        halves = mj.label_descriptor((np.arange(num_points) >= num_points // 2).astype(np.int32))
        return algorithm, algorithm.default_params().replace(descriptor=halves)
    if name == "slerp-grid":
        return mj.SlerpGrid(num_ratios=config.evaluations), None
    if name == "random-search":
        algorithm = mj.RandomSearch(population_size=o["population"])
        return algorithm, algorithm.default_params()
    return _evosax_method(config, shapes)


def _evosax_method(config: Config, shapes):
    """evosax-es (Sep-CMA-ES over the parameters) or merge-es (CMA-ES over per-layer
    coefficients of `operator`)."""
    try:
        from evosax import algorithms
    except ImportError as e:
        raise ValueError(f"config key 'method': {config.method} needs evosax: pip install -e '.[experiments]'") from e
    o = config.options
    if config.method == "evosax-es":
        algorithm = mj.EvosaxES.for_model(algorithms.Sep_CMA_ES, shapes, o["population"])
        return algorithm, algorithm.default_params().replace(std_init=jnp.float32(0.01))
    slerp = o["operator"] == "slerp"
    if slerp and len(config.models) != 2:
        raise ValueError(f"config key 'operator': slerp merges 2 models, got {len(config.models)} (another operator "
                         "merges models[1:] on models[0])")
    algorithm = mj.MergeES.for_model(algorithms.CMA_ES, o["operator"], shapes, mj.PathPrefix(2),
                                     1 if slerp else len(config.models) - 1, o["population"])
    return algorithm, algorithm.default_params()


def check_method(config: Config, setup: Setup):
    """(algorithm, params) of the config's method; a ValueError names the key."""
    shapes = model_shapes(setup.llama_config, jnp.dtype(config.dtype))
    try:
        algorithm, params = method(config, shapes, len(jax.tree.leaves(setup.fitness)[0]))
    except ValueError as e:
        raise ValueError(f"config key 'method' ({config.method}): {e}") from e
    return algorithm, params


def _mesh_of(config: Config):
    if config.mesh is None:
        return None
    return jax.make_mesh((1, *config.mesh), ("runs", "data", "model"), devices=jax.devices()[:math.prod(config.mesh)])


def plan(config: Config, setup: Setup) -> dict:
    """Per-device bytes of one step (`mj.memory_plan`), from shapes alone."""
    algorithm, params = check_method(config, setup)
    net = llama.Llama(setup.llama_config, dtype=jnp.dtype(config.dtype))
    score_fn = scores.scorer(config.kind, net, setup.tokenizer, setup.stops, setup.pad_id, config.max_new_tokens)
    data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.fitness)
    shapes = model_shapes(setup.llama_config, jnp.dtype(config.dtype))
    result = mj.memory_plan(algorithm, score_fn, shapes, data, num_seeds=len(config.models), params=params,
                            mesh=_mesh_of(config), archive_memory=config.archive_memory,
                            chunk_size=config.batch_size)
    return {"parameters": mj.num_params(shapes), **{k: int(v) for k, v in result.items()}}


def load_seed(path: str, dtype) -> tuple[llama.LlamaConfig, dict]:
    """(config, model as host arrays in `dtype`) of a Hugging Face folder or GGUF file."""
    return gguf.load_gguf(path, dtype) if path.endswith(".gguf") else hf.load_hf(path, dtype)


def merge(config: Config, setup: Setup | None = None, progress: bool = True) -> dict:
    """Load the seeds, run the method (checkpointed, resumed, time-limited as the
    config says), score, and write `config.output`; returns report.json's content."""
    t0 = time.perf_counter()
    setup = setup or prepare(config)
    algorithm, params = check_method(config, setup)
    dtype = jnp.dtype(config.dtype)
    seeds = [load_seed(path, dtype)[1] for path in config.models]
    net = llama.Llama(setup.llama_config, dtype=dtype)
    score_fn = scores.scorer(config.kind, net, setup.tokenizer, setup.stops, setup.pad_id, config.max_new_tokens)
    resumed_from = latest_checkpoint(config.checkpoint)
    checkpoint = None if config.checkpoint is None else mj.Checkpointing(  # meta: what no digest of `run` covers
        config.checkpoint, every=config.checkpoint_every, resume=True,
        meta={k: getattr(config, k) for k in ("kind", "template", "max_new_tokens", "dtype")})
    result = mj.run(algorithm, jax.random.key(config.seed), score_fn, setup.fitness, config.evaluations,
                    params=params, seed_models=seeds, log_every=max(1, config.evaluations // 100), steps_per_call=1,
                    chunk_size=config.batch_size, mesh=_mesh_of(config), archive_memory=config.archive_memory,
                    checkpoint=checkpoint, time_limit=config.time_limit, progress=progress, name=config.method)
    best = jax.tree.map(lambda x: np.asarray(x[0]), result.best_models)
    evaluate = jax.jit(lambda model, data: mj.evaluate(score_fn, model, data, config.batch_size))
    score = lambda model: {"fitness": float(np.mean(evaluate(model, setup.fitness))),
                           "test": float(np.mean(evaluate(model, setup.test)))}
    report = {
        "version": mj.__version__, "settings": config.settings(),
        "seeds": [{"path": p, "sha256": recipes.digest(m), **score(m)} for p, m in zip(config.models, seeds)],
        "merged": {"sha256": recipes.digest(best), **score(best)},
        "run": {"evaluations_spent": int(result.passes[-1]), "resumed_from_evaluation": resumed_from,
                "stopped_by_time_limit": bool(result.stopped_by_time_limit), "wall_seconds": result.wall_seconds},
        "curves": {"evaluations": result.passes.tolist(), "best_fitness": result.train_score[0].tolist(),
                   "wall_seconds": result.log_wall_seconds.tolist()},
        "machine": machine()}
    write(config, setup, best, result, report, t0)
    return report


def latest_checkpoint(folder: str | None) -> int | None:
    """The evaluation count of the latest complete checkpoint in `folder`, or None."""
    if folder is None or not os.path.isdir(folder):
        return None
    steps = [int(n) for n in os.listdir(folder) if n.isdigit() and os.path.isdir(os.path.join(folder, n))]
    return max(steps, default=None)


def machine() -> dict:
    """What the run ran on."""
    device = jax.devices()[0]
    return {"device": f"{device.platform}:{device.device_kind}", "devices": len(jax.devices()),
            "processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__}


def write(config: Config, setup: Setup, best, result, report: dict, t0: float) -> None:
    """The merged model (with its card), recipe.json, curves.png and report.json."""
    first = config.models[0]
    source = None if first.endswith(".gguf") else first
    hf.save_hf(setup.llama_config, best, config.output, source=source, card=model_card(config, report))
    if source is None:
        gguf.gguf_tokenizer(first).save(os.path.join(config.output, "tokenizer.json"))
    report["recipe"] = _write_recipe(config, result)
    report["curves_png"] = _plot(config, report)
    report["wall_seconds"] = time.perf_counter() - t0
    with open(os.path.join(config.output, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


def _write_recipe(config: Config, result) -> str | None:
    """recipe.json of the returned slot of a recipe archive (`recipes.to_json`)."""
    state = jax.tree.map(lambda x: x[0], result.state)
    if getattr(state, "recipes", None) is None:
        return None
    means = np.where(np.asarray(state.occupied), np.asarray(state.scores).mean(axis=1), -np.inf)
    recipe = recipes.to_json(state.recipes, state.models[int(np.argmax(means))], list(config.models))
    with open(os.path.join(config.output, "recipe.json"), "w") as f:
        json.dump(recipe, f)
    return "recipe.json"


def _plot(config: Config, report: dict) -> str:
    """curves.png: the best model's fitness against the evaluations spent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(report["curves"]["evaluations"], report["curves"]["best_fitness"], label=config.method)
    for i, seed in enumerate(report["seeds"]):
        ax.axhline(seed["fitness"], ls="--", lw=0.8, color=f"C{i + 1}", label=f"seed {i}")
    ax.set(xlabel="evaluations", ylabel=f"best fitness ({config.kind}, {config.fitness} rows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(config.output, "curves.png"), dpi=100)
    plt.close(fig)
    return "curves.png"


def model_card(config: Config, report: dict) -> str:
    """README.md of the merged model: seeds, method, settings, scores, library version."""
    name = os.path.basename(config.output.rstrip(os.sep))
    seeds = "\n".join(f"| {i} | `{s['path']}` | `{s['sha256']}` |" for i, s in enumerate(report["seeds"]))
    rows = [(f"seed {i}", s) for i, s in enumerate(report["seeds"])] + [("**merged**", report["merged"])]
    table = "\n".join(f"| {n} | {s['fitness']:.4f} | {s['test']:.4f} |" for n, s in rows)
    settings = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in config.settings().items())
    run = report["run"]
    stopped = " (stopped by the time limit: the best model so far)" if run["stopped_by_time_limit"] else ""
    return f"""---
library_name: transformers
tags:
- merge
- m2n2
---

# {name}

A merge of {len(config.models)} Llama-family checkpoints by `{config.method}`, made with
m2n2_jax {mj.__version__} (`m2n2-merge`; M2N2: "Model Merging of Natural Niches"), after
{run['evaluations_spent']} of {config.evaluations} evaluations{stopped}.

## Seeds

sha256: `m2n2_jax.recipes.digest` of the weights as merged ({config.dtype}).

| # | path | sha256 |
|---|---|---|
{seeds}

## Scores

Task `{config.kind}` on `{config.data}`: the first {config.fitness} rows are the fitness
the search maximised, the next {config.test} the test.

| model | fitness | test |
|---|---|---|
{table}

## Settings

| key | value |
|---|---|
{settings}
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2n2-merge", description="Merge Llama-family checkpoints as a YAML config "
                                "says: the seeds, the task, the method, the budget, where to write.",
                                epilog="Every config key: m2n2-merge --help-config, or docs/llm_merge.md.")
    p.add_argument("config", nargs="?", help="a YAML config file")
    p.add_argument("--plan", action="store_true", help="print the per-device memory of one step; load no weight")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action="store_true", help="print every config key and exit")
    return p


def main(argv=None) -> int:
    """The console script: 0 when done, 2 for a refused config, 130 when interrupted."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.help_config:
        print(__doc__)
        return 0
    if args.config is None:
        parser.error("the config file is required")
    try:
        config = read_config(args.config)
        setup = prepare(config)
        if args.plan:
            return _print_plan(plan(config, setup))
        check_method(config, setup)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        report = merge(config, setup, progress=not args.no_progress)
    except ValueError as e:  # e.g. a checkpoint of another run, named by what differs
        parser.exit(2, f"m2n2-merge: error: {e}\n")
    except KeyboardInterrupt:
        at = latest_checkpoint(config.checkpoint)
        print("\ninterrupted: " + (f"rerun the same command to resume from evaluation {at} ({config.checkpoint})"
                                   if at is not None else "nothing saved (set `checkpoint` to make a run resumable)"),
              file=sys.stderr)
        return 130
    merged, seeds = report["merged"], ", ".join(f"{s['test']:.4f}" for s in report["seeds"])
    print(f"merged: fitness {merged['fitness']:.4f}, test {merged['test']:.4f} (seeds on test: {seeds}) -> "
          f"{config.output}")
    return 0


def _print_plan(record: dict) -> int:
    size = lambda n: f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"
    print(f"per device: arguments {size(record['argument_bytes'])}, temporaries {size(record['temp_bytes'])}, "
          f"host {size(record['host_bytes'])} ({record['parameters']:,} parameters per model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
