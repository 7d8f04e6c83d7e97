"""Language models for M2N2: a Llama-family decoder, its checkpoints and its scorers.

- `llama`: the flax decoder (`Llama`, `LlamaConfig`, `token_nll`) of the Llama
  family: Llama 1 to 3.3 (rope_scaling llama3 and linear, biases), Qwen2, Mistral;
- `hf`, `gguf`: Hugging Face checkpoint folders and llama.cpp GGUF files in and out (a
  saved folder is a complete model: its source's tokenizer and generation config,
  every config key carried through, a model card);
- `decode`: batched greedy decoding with a key/value cache, exact-match scoring;
- `gsm8k`: GSM8K scored as the paper scores it;
- `scores`: the merge command's task kinds (exact_match, choice, nll, gsm8k) from JSONL rows;
- `merge_command`: `m2n2-merge CONFIG.yaml`, a user's merge in one command (docs/llm_merge.md).

Nothing in the core package imports this subpackage (`import m2n2_jax` stays lean);
import it explicitly: `from m2n2_jax.llm import hf, llama`. Reading GGUF files and
tokenizers, and the command's YAML, need the `llm` extra.
"""
