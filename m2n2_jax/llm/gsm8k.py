"""GSM8K scored as the paper scores it: chain-of-thought generation, the final number
matched exactly, 0/1 per problem.

The model writes its reasoning freely (greedy, up to `max_new_tokens`, until a stop
token); the last number in the text (commas and a trailing period dropped) must equal
the problem's answer, the number after "####" in GSM8K's solution. Finding that
number needs the text, so `final_number_scores` decodes the generated tokens on the
host with `jax.pure_callback` (the same tokenizer as the prompts); the rest, the
generation, stays one traced function, so it runs inside `m2n2_jax.run`'s scan.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2n2_jax.llm import decode
from m2n2_jax.llm.llama import Llama

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gold(answer: str) -> int:
    """The final number of a GSM8K solution ("... #### 1,234" -> 1234); GSM8K's are all
    integers, below 2^31 in magnitude."""
    value = answer.rsplit("####", 1)[-1].strip().replace(",", "")
    number = int(value)
    if abs(number) >= 2**31:
        raise ValueError(f"answer {number} does not fit in int32")
    return number


def final_number(text: str) -> float | None:
    """The last number written in `text` (commas dropped), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def chat_prompt(question: str, system: str | None = None) -> str:
    """A ChatML prompt (SmolLM2's template) for one problem; `system` None keeps the
    template's default system message."""
    system = system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def final_number_scores(net: Llama, tokenizer, max_new_tokens: int, stop_tokens: Sequence[int], pad_id: int):
    """score_fn(model, (prompts (M, P), mask (M, P), gold (M,) int32)) -> (M,) float32:
    1.0 where the last number of the greedy generation equals the gold answer."""
    stops = tuple(int(t) for t in stop_tokens)

    def check(tokens, answers):
        tokens, answers = np.asarray(tokens), np.asarray(answers)
        flat = tokens.reshape(-1, tokens.shape[-1])
        texts = tokenizer.decode_batch([[t for t in row if t not in stops] for row in flat.tolist()],
                                       skip_special_tokens=True)
        found = [final_number(text) for text in texts]
        right = [f is not None and f == float(g) for f, g in zip(found, answers.reshape(-1).tolist())]
        return np.asarray(right, np.float32).reshape(answers.shape)

    def score_fn(model, batch):
        prompts, mask, answers = batch
        out = decode.greedy(net, model, prompts, mask, max_new_tokens, stops, pad_id)
        return jax.pure_callback(check, jax.ShapeDtypeStruct(answers.shape, jnp.float32), out, answers,
                                 vmap_method="broadcast_all")

    return score_fn
