"""GSM8K (vendored) and the two skills of the real-model merge, as token batches.

Both skills are drawn from GSM8K (experiments/data/gsm8k, MIT):
- "arithmetic": its calculator steps `<<48/2=24>>` with one operator (+, -, *, /) and
  an integer result, asked as "Calculate: 48/2" -> "24";
- "reversal": 4 to 6 distinct words of its questions, asked as "Reverse the order of
  these words: tom bought seven apples" -> "apples seven bought tom".
Three disjoint sources, so no question is in two of them:
- "finetune": GSM8K training problems 1,319.. (the specialists' fine-tuning data),
- "fitness": training problems 0..1,318 (the paper's fitness split: M2N2's questions),
- "test": the 1,319 test problems.
An arithmetic expression found in an earlier source is left out of the later ones.

A question is a chat prompt in SmolLM2's template (a short system message asking for
the result only) and its answer; both skills are scored 0/1, exact match of the
greedy generation (answer then `<|im_end|>`, `llm_real_scoring`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gsm8k")
SHA256 = {"train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
          "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"}
FITNESS_PROBLEMS = 1319  # the paper's fitness set: the first 1,319 training problems
SKILLS = ("arithmetic", "reversal")
SOURCES = ("finetune", "fitness", "test")
SYSTEM = "Reply with the result only."
END = "<|im_end|>"
CALCULATOR = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
ONE_OPERATOR = re.compile(r"\d+[-+*/]\d+")
WORD = re.compile(r"\b[a-z]{3,9}\b")


def gsm8k(split: str) -> list[dict]:
    """The problems of GSM8K's "train" or "test" split, checked against their sha256."""
    path = os.path.join(DATA, f"{split}.jsonl")
    with open(path, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != SHA256[split]:
        raise ValueError(f"{path} is not the vendored GSM8K file (sha256 differs)")
    return [json.loads(line) for line in raw.decode().splitlines()]


def problems(source: str) -> list[dict]:
    """The GSM8K problems of a source: finetune, fitness or test (module docstring)."""
    if source == "test":
        return gsm8k("test")
    train = gsm8k("train")
    if source == "fitness":
        return train[:FITNESS_PROBLEMS]
    if source == "finetune":
        return train[FITNESS_PROBLEMS:]
    raise ValueError(f"source {source!r}: choose one of {SOURCES}")


def calculator_steps(items: list[dict]) -> list[tuple[str, str]]:
    """(expression, result) of every one-operator calculator step with an integer
    result, spaces removed, first occurrence kept, in the problems' order."""
    seen, steps = set(), []
    for item in items:
        for expression, result in CALCULATOR.findall(item["answer"]):
            expression, result = expression.replace(" ", ""), result.strip()
            if ONE_OPERATOR.fullmatch(expression) and re.fullmatch(r"-?\d+", result) and expression not in seen:
                seen.add(expression)
                steps.append((expression, result))
    return steps


def question_words(items: list[dict]) -> list[str]:
    """The distinct lowercase words (3-9 letters) of the problems' questions, sorted."""
    return sorted({w for item in items for w in WORD.findall(item["question"])})


def questions(skill: str, source: str, count: int | None, seed: int) -> list[tuple[str, str]]:
    """`count` (question, answer) texts of a skill from a source, drawn with `seed`
    (None: every arithmetic step of the source, shuffled)."""
    rng = np.random.default_rng([seed, SKILLS.index(skill), SOURCES.index(source)])
    items = problems(source)
    if skill == "arithmetic":
        earlier = {e for s in SOURCES[:SOURCES.index(source)] for e, _ in calculator_steps(problems(s))}
        steps = [step for step in calculator_steps(items) if step[0] not in earlier]
        if count is not None and count > len(steps):
            raise ValueError(f"{source} has {len(steps)} arithmetic questions, {count} asked")
        order = rng.permutation(len(steps))[:count]
        return [(f"Calculate: {steps[i][0]}", steps[i][1]) for i in order]
    if skill == "reversal":
        words = question_words(items)
        out = []
        for _ in range(count if count is not None else 5000):
            picked = [words[i] for i in rng.choice(len(words), rng.integers(4, 7), replace=False)]
            out.append((f"Reverse the order of these words: {' '.join(picked)}", " ".join(picked[::-1])))
        return out
    raise ValueError(f"skill {skill!r}: choose one of {SKILLS}")


def chat(question: str) -> str:
    """SmolLM2's chat template around one user message, the generation prompt added."""
    return (f"<|im_start|>system\n{SYSTEM}{END}\n<|im_start|>user\n{question}{END}\n"
            "<|im_start|>assistant\n")


def encode(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids ending in <|im_end|>) of (question, answer) texts."""
    prompts = [tokenizer.encode(chat(q)).ids for q, _ in pairs]
    answers = [tokenizer.encode(a + END).ids for _, a in pairs]
    return prompts, answers
