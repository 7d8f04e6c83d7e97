"""`m2n2-merge CONFIG.yaml` (m2n2_jax.llm.merge_command) end to end, and each task kind
of m2n2_jax.llm.scores against a NumPy reference.

The seeds are tests/fixtures/llama/gqa_untied (a tiny random Llama that transformers
wrote, vocabulary 97) and a perturbed copy, with a 97-token character tokenizer made
here (BOS added to encoded texts, as Llama tokenizers do). The references score each
row alone, unpadded: logits from the model's plain forward pass, log-softmax,
argmax and means in NumPy (float64).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from m2n2_jax import recipes
from m2n2_jax.llm import gguf, gsm8k, hf, llama, merge_command, scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "llama", "gqa_untied")
CHARS = [" "] + [chr(c) for c in range(33, 127) if chr(c) not in "`~"]
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}  # 97 ids, the model's
WIDTH = 64  # the reference's forward pass reads right-padded rows of this many tokens


def char_tokenizer() -> Tokenizer:
    """One token per character; "<s>" before every encoded text unless add_special_tokens=False."""
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def choice_rows(count: int) -> list[dict]:
    return [{"prompt": f"Q{i}: the {['cat', 'sun', 'key'][i % 3]} is ", "choices": ["red", "big", "on 7"][: 2 + i % 2],
             "answer": i % 2} for i in range(count)]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A folder with seeds a (the fixture), b (perturbed) and c (a's copy), each with the
    tokenizer, and rows.jsonl of 12 choice rows."""
    folder = tmp_path_factory.mktemp("seeds")
    config, model = hf.load_hf(FIXTURE)
    shutil.copytree(FIXTURE, folder / "a")
    noise = np.random.default_rng(1)
    hf.save_hf(config, jax.tree.map(lambda x: x + 0.1 * noise.standard_normal(x.shape).astype(x.dtype), model),
               str(folder / "b"))
    for name in ("a", "b"):
        char_tokenizer().save(str(folder / name / "tokenizer.json"))
    shutil.copytree(folder / "a", folder / "c")  # a third seed
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choice_rows(12)))
    return folder


def write_config(folder, name: str, **changes) -> str:
    """merge.yaml in `folder`: 20 evaluations of m2n2 on 6 + 6 choice rows; `changes`
    replace keys (None removes one)."""
    raw = {"models": ["a", "b"], "task": {"kind": "choice", "data": "rows.jsonl", "fitness": 6, "test": 6},
           "evaluations": 20, "output": f"out-{name}", "checkpoint": f"ckpt-{name}", "archive_size": 4,
           "batch_size": 4, **changes}
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({k: v for k, v in raw.items() if v is not None}, f)
    return path


def run_command(path: str, *flags: str) -> tuple[dict, object]:
    """(report.json, the RunResult that mj.run returned) of `m2n2-merge path`."""
    results = []
    real_run = merge_command.mj.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(merge_command.mj, "run", lambda *a, **k: results.append(real_run(*a, **k)) or results[-1])
        assert merge_command.main([path, "--no-progress", *flags]) == 0
    config = merge_command.read_config(path)
    with open(os.path.join(config.output, "report.json")) as f:
        return json.load(f), results[0]


@pytest.fixture(scope="module")
def merged(seeds):
    t0 = time.perf_counter()
    report, result = run_command(write_config(seeds, "full"))
    print(f"\nm2n2-merge, 20 evaluations: {time.perf_counter() - t0:.1f} s")
    return report, result


@pytest.fixture(scope="module")
def logits_of():
    """model -> logits, `logits(ids)` (len(ids), V) float64 of one unpadded row (read
    from a right-padded one: the model is causal)."""
    net = llama.Llama(hf.load_hf(FIXTURE)[0])
    forward = jax.jit(lambda p, x: net.apply(p, x)[0])

    def logits_of(model):
        def logits(ids):
            row = np.zeros((1, WIDTH), np.int32)
            row[0, :len(ids)] = ids
            return np.asarray(forward(model, row), np.float64)[0, :len(ids)]

        return logits

    return logits_of


@pytest.fixture(scope="module")
def reference(logits_of):
    """(tokenizer, the fixture's model, its `logits`)."""
    model = hf.load_hf(FIXTURE)[1]
    return char_tokenizer(), model, logits_of(model)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_choice(tokenizer, logits, row, template="{prompt}") -> float:
    """lm-eval's multiple choice: the argmax of each choice's summed log-probability."""
    prompt = template.format(**row)
    sums = []
    for choice in row["choices"]:
        context, continuation = prompt.rstrip(), prompt[len(prompt.rstrip()):] + choice
        ctx = tokenizer.encode(context, add_special_tokens=False).ids
        ids = tokenizer.encode(context + continuation, add_special_tokens=False).ids
        lp = log_softmax(logits(ids))
        sums.append(sum(lp[i - 1, ids[i]] for i in range(len(ctx), len(ids))))
    return float(np.argmax(sums) == row["answer"])


def np_nll(tokenizer, logits, row) -> float:
    """exp(-mean next-token loss) of the text, BOS included as the tokenizer adds it."""
    ids = tokenizer.encode(row["text"]).ids
    lp = log_softmax(logits(ids))
    return float(np.exp(-np.mean([-lp[i, ids[i + 1]] for i in range(len(ids) - 1)])))


def np_greedy(logits, ids, steps: int, stops) -> list[int]:
    """Greedy tokens after `ids`, up to `steps`, the first stop token included."""
    out = []
    while len(out) < steps and not (out and out[-1] in stops):
        out.append(int(np.argmax(logits(ids + out)[-1])))
    return out


def test_merge_writes_a_complete_model_its_report_and_recipe(seeds, merged, logits_of):
    report, result = merged
    out = seeds / "out-full"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "report.json", "recipe.json", "curves.png"):
        assert (out / name).is_file(), name
    # The saved model is the one the run returned, and recipe.json remakes it from the seeds.
    _, saved = hf.load_hf(str(out))
    best = jax.tree.map(lambda x: np.asarray(x[0]), result.best_models)
    assert recipes.digest(saved) == recipes.digest(best) == report["merged"]["sha256"]
    seed_models = [hf.load_hf(str(seeds / n))[1] for n in ("a", "b")]
    recipe = json.loads((out / "recipe.json").read_text())
    assert [s["name"] for s in recipe["seeds"]] == [str(seeds / "a"), str(seeds / "b")]
    assert recipes.digest(recipes.from_json(recipe, seed_models)) == report["merged"]["sha256"]
    # report.json: 20 evaluations, the curve, the settings, every score as the reference re-scores it
    assert report["run"] == {**report["run"], "evaluations_spent": 20, "stopped_by_time_limit": False,
                             "resumed_from_evaluation": None}
    assert report["curves"]["evaluations"][-1] == 20 and len(report["curves"]["best_fitness"]) >= 10
    assert report["settings"]["method"] == "m2n2" and report["settings"]["archive"] == "recipes"
    assert report["machine"]["devices"] == len(jax.devices()) and report["wall_seconds"] > 0
    tokenizer, rows = char_tokenizer(), choice_rows(12)
    for entry, model in zip(report["seeds"] + [report["merged"]], seed_models + [saved]):
        logits = logits_of(model)
        assert entry["fitness"] == pytest.approx(np.mean([np_choice(tokenizer, logits, r) for r in rows[:6]]))
        assert entry["test"] == pytest.approx(np.mean([np_choice(tokenizer, logits, r) for r in rows[6:]]))
    assert report["merged"]["fitness"] >= max(s["fitness"] for s in report["seeds"])
    card = (out / "README.md").read_text()
    for text in (str(seeds / "a"), report["seeds"][1]["sha256"], "`m2n2`", f"{report['merged']['test']:.4f}",
                 "choice"):
        assert text in card, text


def test_a_run_stopped_by_its_time_limit_resumes_to_the_uninterrupted_result(seeds, merged, capsys):
    full, _ = merged
    path = write_config(seeds, "resumed", time_limit=1e-6)
    stopped, _ = run_command(path)
    assert stopped["run"]["stopped_by_time_limit"] and stopped["run"]["evaluations_spent"] < 20
    assert (seeds / "out-resumed" / "model.safetensors").is_file()  # the best model so far
    resumed, _ = run_command(write_config(seeds, "resumed"))  # the same run, no time limit
    assert resumed["run"]["resumed_from_evaluation"] == stopped["run"]["evaluations_spent"]
    assert resumed["merged"] == full["merged"] and resumed["seeds"] == full["seeds"]
    assert resumed["curves"]["best_fitness"] == full["curves"]["best_fitness"]
    assert (seeds / "out-resumed" / "recipe.json").read_text() == (seeds / "out-full" / "recipe.json").read_text()
    other = {"kind": "choice", "data": "rows.jsonl", "fitness": 6, "test": 6, "template": "Q {prompt}"}
    with pytest.raises(SystemExit):  # another task cannot resume this checkpoint
        merge_command.main([write_config(seeds, "resumed", task=other), "--no-progress"])
    assert "belongs to a different run (" in capsys.readouterr().err


def test_ctrl_c_leaves_a_checkpoint_that_resumes(seeds):
    """SIGINT to the command in a subprocess once it has checkpointed: exit 130, a
    message naming the evaluation to resume from, and a rerun resumes there."""
    path = write_config(seeds, "interrupted", evaluations=400, checkpoint_every=1)
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    # SIGINT's default action restored in the child: a test suite started in the
    # background (`make test &`) ignores SIGINT, and a child inherits that, so the
    # command would run on to its end (exit 0) whatever this test sends it.
    process = subprocess.Popen([sys.executable, "-m", "m2n2_jax.llm.merge_command", path, "--no-progress"],
                               cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while merge_command.latest_checkpoint(str(seeds / "ckpt-interrupted")) is None and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it was interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    at = merge_command.latest_checkpoint(str(seeds / "ckpt-interrupted"))
    assert process.returncode == 130, err
    assert f"rerun the same command to resume from evaluation {at}" in err
    report, _ = run_command(write_config(seeds, "interrupted", evaluations=400, checkpoint_every=1, time_limit=1e-6))
    assert report["run"]["resumed_from_evaluation"] == at and report["run"]["evaluations_spent"] == at + 1


BAD = [  # (change to the good config, what the refusal says)
    ({"archive_size": "x"}, "config key 'archive_size' must be an int >= 2, got 'x'"),
    ({"archve_size": 4}, "unknown config key 'archve_size'"),
    ({"evaluations": None}, "config key 'evaluations' is missing"),
    ({"evaluations": 2}, "config key 'evaluations' must be >= 3"),
    ({"method": "m2n3"}, "config key 'method' must be one of m2n2, "),
    ({"population": 4}, "config key 'population' does not apply to method 'm2n2'"),
    ({"models": ["a"]}, "config key 'models' must be a list of at least 2"),
    ({"models": ["a", "nope"]}, "models[1]"),
    ({"models": ["a", os.path.join(ROOT, "tests", "fixtures", "llama", "mha_tied")]},
     "models[1] is another architecture than models[0] (vocab_size 89 vs 97)"),
    ({"output": "a"}, "config key 'output'"),
    ({"output": "ckpt-bad/out"}, "config keys 'output' and 'checkpoint' must be separate"),
    ({"task": {"kind": "mcq", "data": "rows.jsonl", "fitness": 6, "test": 6}}, "config key 'task.kind' must be one of"),
    ({"task": {"kind": "choice", "data": "rows.jsonl", "fitness": 0, "test": 6}},
     "config key 'task.fitness' must be a positive int, got 0"),
    ({"task": {"kind": "choice", "data": "rows.jsonl", "fitness": 6, "test": 7}}, "holds 12 rows, fewer than the 13"),
    ({"task": {"kind": "choice", "data": "rows.jsonl", "fitness": 6}}, "config key 'task.test' is missing"),
    ({"task": {"kind": "choice", "data": "rows.jsonl", "fitness": 6, "test": 6, "template": "{question}"}},
     "config key 'task.template'"),
    ({"task": {"kind": "gsm8k", "data": "rows.jsonl", "fitness": 6, "test": 6}}, "line 1: field 'question'"),
    ({"max_new_tokens": 8}, "config key 'max_new_tokens' applies to task kind gsm8k only"),
    ({"mesh": [3, 1]}, "config key 'mesh' must be at most the 2 devices"),
    ({"time_limit": -1}, "config key 'time_limit' must be a number of seconds > 0, got -1"),
    ({"method": "slerp-grid", "archive_size": None, "models": ["a", "b", "c"]},
     "config key 'models' must be 2 checkpoints for slerp-grid"),
    ({"models": ["a", "b/../a"]}, "config key 'models' must be distinct checkpoints"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m.split(" must")[0][:40] for _, m in BAD])
def test_a_bad_config_is_refused_naming_the_key_before_any_weight_is_loaded(seeds, monkeypatch, capsys, changes,
                                                                               message):
    monkeypatch.setattr(merge_command, "load_seed", lambda *a: pytest.fail("a weight was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        merge_command.main([write_config(seeds, "bad", **changes)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_config_that_is_no_mapping_or_lacks_a_tokenizer_is_refused(seeds, tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- models\n")
    shutil.copytree(FIXTURE, tmp_path / "bare")
    for path, message in [(str(tmp_path / "list.yaml"), "the config must be a mapping"),
                          (write_config(seeds, "bare", models=[str(tmp_path / "bare"), "b"]),
                           "models[0] (" + str(tmp_path / "bare") + ") holds no tokenizer.json")]:
        with pytest.raises(SystemExit):
            merge_command.main([path])
        assert message in capsys.readouterr().err


# --- each task kind against a NumPy reference ------------------------------------------


def score(kind, model, rows, template, stops=(2,), pad_id=2, max_new_tokens=8) -> np.ndarray:
    """The command's scores of `rows` (one batch, left or right padded as the kind does)."""
    tokenizer = char_tokenizer()
    batch = scores.encode(kind, tokenizer, rows, template, stops, pad_id)
    net = llama.Llama(hf.load_hf(FIXTURE)[0])
    return np.asarray(jax.jit(scores.scorer(kind, net, tokenizer, stops, pad_id, max_new_tokens))(model, batch))


def test_choice_is_the_argmax_of_summed_log_likelihoods(reference):
    tokenizer, model, logits = reference
    rows = choice_rows(9) + [{"prompt": "x", "choices": ["y", "yy", "yyy", "z"], "answer": 3}]
    expected = [np_choice(tokenizer, logits, r, "Say: {prompt}") for r in rows]
    np.testing.assert_array_equal(score("choice", model, rows, "Say: {prompt}"), expected)
    assert 0 < np.mean(expected) < 1


def test_nll_maps_the_mean_token_loss_to_exp_minus_it(reference):
    tokenizer, model, logits = reference
    rows = [{"text": t} for t in ("a", "The cat sat.", "2 + 2 = 4, and 3 + 3 = 6", "zzzzzzzzzz")]
    got = score("nll", model, rows, "{text}")
    np.testing.assert_allclose(got, [np_nll(tokenizer, logits, r) for r in rows], rtol=1e-5)
    assert np.all((got > 0) & (got < 1))


def test_exact_match_is_the_answer_then_the_stop_token(reference):
    """The stop token is one the model emits, so some rows score 1."""
    tokenizer, model, logits = reference
    prompts = [f"{i}+{i}=" for i in range(12)]
    made = [np_greedy(logits, tokenizer.encode(p).ids, 3, ()) for p in prompts]
    hit = next(i for i, g in enumerate(made) if min(g) >= 3 and g[2] not in g[:2])
    stops = (made[hit][2],)
    rows = [{"prompt": p, "answer": tokenizer.decode(g[:2])} for p, g in zip(prompts, made)]
    rows[(hit + 1) % 12]["answer"] = "no"
    expected = []
    for r in rows:
        answer = tokenizer.encode(r["answer"], add_special_tokens=False).ids + [stops[0]]
        steps = max(len(tokenizer.encode(x["answer"], add_special_tokens=False).ids) + 1 for x in rows)
        expected.append(float(np_greedy(logits, tokenizer.encode(r["prompt"]).ids, steps, stops) == answer))
    np.testing.assert_array_equal(score("exact_match", model, rows, "{prompt}", stops), expected)
    assert expected[hit] == 1 and 0 in expected


def test_gsm8k_is_the_last_number_of_the_generation(reference):
    tokenizer, model, logits = reference
    questions = [f"Tom has {i} apples and {i + 3} pears. How many?" for i in range(10)]
    rows = []
    for q in questions:
        text = tokenizer.decode(np_greedy(logits, tokenizer.encode(f"Q: {q}\nA:").ids, 8, (2,)),
                                skip_special_tokens=True)
        found = gsm8k.final_number(text)
        right = found is not None and found == int(found) and abs(found) < 2**31
        rows.append({"question": q, "answer": f"... #### {int(found) if right else 123456}", "right": right})
    got = score("gsm8k", model, rows, "Q: {question}\nA:")
    np.testing.assert_array_equal(got, [float(r["right"]) for r in rows])
    assert 0 < got.sum() < len(rows)


def test_plan_prints_the_memory_of_one_step_without_loading_a_weight(seeds, monkeypatch, capsys):
    monkeypatch.setattr(merge_command, "load_seed", lambda *a: pytest.fail("a weight was loaded"))
    assert merge_command.main([write_config(seeds, "plan"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("per device: arguments ") and "(44,880 parameters per model)" in out


def write_gguf(path: str, config, model) -> None:
    """A float32 llama.cpp GGUF file of `model` (q/k rows permuted as llama.cpp's
    converter does) with a byte-level BPE tokenizer of the model's 97 tokens (one merge,
    "a b"), eos 2."""
    import gguf as gguf_package

    writer = gguf_package.GGUFWriter(path, "llama")
    c = config
    for add, value in [("block_count", c.num_hidden_layers), ("embedding_length", c.hidden_size),
                       ("feed_forward_length", c.intermediate_size), ("head_count", c.num_attention_heads),
                       ("head_count_kv", c.num_key_value_heads), ("rope_dimension_count", c.head_dim),
                       ("rope_freq_base", c.rope_theta), ("layer_norm_rms_eps", c.rms_norm_eps),
                       ("context_length", c.max_position_embeddings), ("vocab_size", c.vocab_size)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<unk>", "<s>", "</s>", "Ġ"] + [t for t in CHARS[1:] if t != "|"] + ["ab"])
    writer.add_token_merges(["a b"])
    writer.add_token_types([3, 3, 3] + [1] * len(CHARS))
    writer.add_eos_token_id(2)
    names = {hf_name: name for name, hf_name in gguf.GGUF_TENSORS.items()}
    for name, x in hf.to_hf_tensors(config, model).items():
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], name.split(".", 3)[3]
            heads = {"self_attn.q_proj.weight": c.num_attention_heads, "self_attn.k_proj.weight": c.num_key_value_heads}
            if rest in heads:  # llama.cpp's permutation, the inverse of gguf.unpermute_rows
                x = x.reshape(heads[rest], 2, -1, x.shape[-1]).swapaxes(1, 2).reshape(x.shape)
            name = f"blk.{i}.{next(k for k, v in gguf.GGUF_LAYER_TENSORS.items() if v == rest)}"
        else:
            name = names[name]
        writer.add_tensor(name, np.ascontiguousarray(x, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_seeds_give_a_hugging_face_model_with_their_tokenizer(tmp_path):
    config, model = hf.load_hf(FIXTURE)
    noise = np.random.default_rng(2)
    write_gguf(str(tmp_path / "a.gguf"), config, model)
    write_gguf(str(tmp_path / "b.gguf"), config,
               jax.tree.map(lambda x: x + 0.1 * noise.standard_normal(x.shape).astype(x.dtype), model))
    gguf_config, gguf_model = gguf.load_gguf(str(tmp_path / "a.gguf"))
    assert gguf_config.rms_norm_eps == np.float32(config.rms_norm_eps)  # GGUF holds it as float32
    assert dataclasses.replace(gguf_config, rms_norm_eps=config.rms_norm_eps) == config
    assert recipes.digest(gguf_model) == recipes.digest(model)
    texts = ["the cat sat", "a b c d", "12 + 30 = 42", "no way", "hello there", "up and down"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    path = str(tmp_path / "merge.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"models": ["a.gguf", "b.gguf"], "task": {"kind": "nll", "data": "rows.jsonl", "fitness": 3,
                                                                 "test": 3}, "evaluations": 6, "output": "out"}, f)
    report, result = run_command(path)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "curves.png", "model.safetensors", "recipe.json",
                                       "report.json", "tokenizer.json"]
    saved_config, saved = hf.load_hf(str(out))
    assert saved_config == gguf_config
    assert recipes.digest(saved) == recipes.digest(jax.tree.map(lambda x: np.asarray(x[0]), result.best_models))
    text = "Tom's 2 cats ate a cab </s>"
    assert hf.load_tokenizer(str(out)).encode(text).ids == gguf.gguf_tokenizer(str(tmp_path / "a.gguf")).encode(
        text).ids
    assert all(0 < s["fitness"] < 1 for s in report["seeds"]) and report["settings"]["models"][0].endswith("a.gguf")
