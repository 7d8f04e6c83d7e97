"""Character-level question/answer skills for the language-model merging experiment.

- addition: "123+456=" -> "579" (operands 100..999, so answers have 3 or 4 digits)
- reversal: "r:abcd=" -> "dcba" (3 to 6 lowercase letters)
- shift:    "s:abyz=" -> "bcza" (3 to 6 lowercase letters, each replaced by the next)
- copy:     "c:ab12=" -> "ab12" (3 to 6 letters or digits; generic pre-training data)

A skill name with the suffix "_short" (e.g. "addition_short") asks for its short
form: 2-digit operands, or 3 to 4 letters (pre-training data that teaches the format).

Shapes are static: prompts are left-padded to PROMPT_LEN and answers right-padded to
ANSWER_LEN with the pad character "_" (token 0), so every question ends at the same
position and exact match compares all ANSWER_LEN answer tokens, padding included.
Everything is generated locally from a NumPy Generator.

SCORERS names each skill's default score (`m2n2_jax.tasks.transformer.SCORERS`):
addition by exact match (0/1 per question, as GSM8K), the letter tasks by partial
credit (the share of the answer's characters right, a continuous reward in [0, 1] as
WebShop's).
"""

from __future__ import annotations

import string

import numpy as np

VOCAB = "_0123456789+=:" + string.ascii_lowercase
PAD = 0
PROMPT_LEN = 9
ANSWER_LEN = 6
SKILLS = ("addition", "reversal", "shift", "copy")
SCORERS = {"addition": "exact_match", "reversal": "partial_credit", "shift": "partial_credit", "copy": "partial_credit"}
_INDEX = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    """Token ids of `text` (characters of VOCAB)."""
    try:
        return [_INDEX[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the vocabulary {VOCAB!r}") from None


def decode(tokens) -> str:
    """Text of token ids, padding removed."""
    return "".join(VOCAB[int(t)] for t in tokens if int(t) != PAD)


def sample_question(skill: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (prompt, answer) pair of `skill` (a name of SKILLS, optionally + "_short")."""
    name, short = skill, skill.endswith("_short")
    skill = skill.removesuffix("_short")
    if skill == "addition":
        a, b = rng.integers(10, 100, size=2) if short else rng.integers(100, 1000, size=2)
        return f"{a}+{b}=", str(a + b)
    n = int(rng.integers(3, 5 if short else 7))
    if skill == "reversal":
        s = "".join(rng.choice(list(string.ascii_lowercase), n))
        return f"r:{s}=", s[::-1]
    if skill == "shift":
        s = "".join(rng.choice(list(string.ascii_lowercase), n))
        return f"s:{s}=", "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)
    if skill == "copy":
        s = "".join(rng.choice(list(string.ascii_lowercase + string.digits), n))
        return f"c:{s}=", s
    raise ValueError(f"unknown skill {name!r}; choose one of {SKILLS}, optionally with the suffix '_short'")


def questions(skill: str, n: int, rng: np.random.Generator, exclude=frozenset()) -> list[tuple[str, str]]:
    """`n` distinct questions of `skill`, none of whose prompts is in `exclude`."""
    out, seen = [], set(exclude)
    while len(out) < n:
        q = sample_question(skill, rng)
        if q[0] not in seen:
            seen.add(q[0])
            out.append(q)
    return out


def mixture(weights: dict[str, float], n: int, rng: np.random.Generator, exclude=frozenset()) -> list[tuple[str, str]]:
    """`n` questions (repeats allowed), each of a skill drawn with probability ∝ weights,
    avoiding the prompts in `exclude` (e.g. the test questions)."""
    names = list(weights)
    p = np.asarray([weights[k] for k in names], np.float64)
    counts = rng.multinomial(n, p / p.sum())
    out = []
    for name, count in zip(names, counts):
        while count > 0:
            q = sample_question(name, rng)
            if q[0] not in exclude:
                out.append(q)
                count -= 1
    return [out[i] for i in rng.permutation(len(out))]


def tokenize(pairs, prompt_len: int = PROMPT_LEN, answer_len: int = ANSWER_LEN) -> tuple[np.ndarray, np.ndarray]:
    """(prompts (n, prompt_len), answers (n, answer_len)) int32: prompts left-padded,
    answers right-padded with PAD."""
    prompts = np.full((len(pairs), prompt_len), PAD, np.int32)
    answers = np.full((len(pairs), answer_len), PAD, np.int32)
    for i, (prompt, answer) in enumerate(pairs):
        if len(prompt) > prompt_len or len(answer) > answer_len:
            raise ValueError(f"question {prompt!r} -> {answer!r} is longer than ({prompt_len}, {answer_len})")
        prompts[i, prompt_len - len(prompt):] = encode(prompt)
        answers[i, : len(answer)] = encode(answer)
    return prompts, answers
