"""Tiny random checkpoints, SAEs and configs, for tests and for trying the commands offline.

    python -m epo_tui.engine.tiny DIR [--family gpt2|gemma|gemma2|gemma3_text|gemma3|gpt_neox|llama|...]
                                     [--architecture standard|jumprelu|topk]

writes DIR/model (a Hugging Face checkpoint with a small trained BPE tokenizer), DIR/sae (a sae-lens
folder with random weights) and DIR/config.toml pointing at both. Weights are random: activations
and fluency numbers mean nothing, but every code path is the real one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

LLAMAS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")  # models/llama.py
FAMILIES = ("gpt2", "gemma", "gemma2", "gemma3_text", "gemma3", "gpt_neox", *LLAMAS)
ARCHITECTURES = ("standard", "jumprelu", "topk")

# Training text for the tiny tokenizer: enough variety that common English words get merged.
_CORPUS = """The quick brown fox jumps over the lazy dog. Hello world, this is a tiny model.
Legalization of cannabis was debated; officials refused to comment on the new law.
Wonder Woman campaigns for justice. Animals at the shelter need homes, quite happily.
Translate from English to French: left and right, up and down, hot and cold.
Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation! Questions? Yes: no; maybe - (perhaps).
"""
_SPECIALS = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    # Pythia's tokenizer: <|endoftext|> begins and ends texts, <|padding|> pads
    "gpt_neox": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                 "pad_token": "<|padding|>"},
    "llama": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"},
}
# chat-turn tokens, special like the real tokenizers' (never proposed)
_CHAT_TOKENS = {"gemma": ["<start_of_turn>", "<end_of_turn>"],
                "llama": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
# A multimodal Gemma 3 tokenizer's image tokens, named as its tokenizer_config.json names them.
GEMMA3_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_soft_token>"}


def _tokenizer_kind(family: str) -> str:
    if family in LLAMAS:
        return "llama"
    return family if family in ("gpt2", "gpt_neox") else "gemma"


def write_tokenizer(folder: Path, family: str, vocab_size: int = 320) -> int:
    """A byte-level BPE tokenizer trained on a built-in paragraph; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    kind = _tokenizer_kind(family)
    specials, chat = _SPECIALS[kind], _CHAT_TOKENS.get(kind, [])
    special_tokens = list(dict.fromkeys(specials.values())) + chat
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    named = {"extra_special_tokens": GEMMA3_IMAGE_TOKENS} if family == "gemma3" else {}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials, **named)
    if chat:
        wrapped.add_special_tokens({"additional_special_tokens": chat})
    wrapped.save_pretrained(folder)
    return len(wrapped)


def hf_config(family: str, vocab_size: int, **overrides):
    """A small transformers config of the family (2 layers, d_model 32)."""
    from transformers import (AutoConfig, Gemma2Config, Gemma3Config, Gemma3TextConfig, GemmaConfig, GPT2Config,
                              GPTNeoXConfig, SiglipVisionConfig)

    if family == "gpt2":
        kwargs = dict(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                      bos_token_id=0, eos_token_id=0)
        return GPT2Config(**{**kwargs, **overrides})
    if family == "gpt_neox":  # Pythia's shape: parallel blocks, a quarter of each head rotates, untied head
        kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=128, rotary_pct=0.25,
                      use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        return GPTNeoXConfig(**{**kwargs, **overrides})
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                  pad_token_id=2, bos_token_id=0, eos_token_id=1)
    if family == "gemma":
        return GemmaConfig(**{**common, **overrides})
    if family == "qwen3_moe":  # 4 experts, top 2, renormalised (as Qwen3-30B-A3B)
        common.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)
    if family in LLAMAS:
        return AutoConfig.for_model(family, **{**common, **overrides})
    if family == "gemma2":
        return Gemma2Config(**{**common, "sliding_window": 4, "query_pre_attn_scalar": 8, **overrides})
    # Gemma 3: a sliding and a global layer, each with its own RoPE (linear scaling on the global one)
    top = {k: overrides.pop(k) for k in _GEMMA3_TOP_LEVEL if k in overrides}
    text = Gemma3TextConfig(**{**common, "sliding_window": 4, "query_pre_attn_scalar": 8,
                               "layer_types": ["sliding_attention", "full_attention"],
                               "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                                   "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                      "rope_theta": 1000.0}},
                               **{k: v for k, v in top.items() if k in _GEMMA3_BOTH}, **overrides})
    if family == "gemma3_text":
        return text
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4)
    return Gemma3Config(text_config=text, vision_config=vision, **{"mm_tokens_per_image": 4, **top})


# Keys of a multimodal Gemma 3's own config (the rest go to its text_config); tying and initialisation
# are read from both levels, so they are set on both.
_GEMMA3_BOTH = ("tie_word_embeddings", "initializer_range")
_GEMMA3_TOP_LEVEL = _GEMMA3_BOTH + ("mm_tokens_per_image", "image_token_index", "boi_token_index", "eoi_token_index")


def write_tiny_checkpoint(folder: Path, family: str = "gpt2", seed: int = 0, **config_overrides) -> Path:
    """A random transformers model of the family saved with save_pretrained (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder, family)
    if family == "gemma3":  # the config names the tokenizer's image tokens
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = {f"{name.removesuffix('_token')}_token_index": tokenizer.convert_tokens_to_ids(token)
               for name, token in GEMMA3_IMAGE_TOKENS.items()}
        config_overrides = {**ids, **config_overrides}
    config = hf_config(family, vocab_size, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases too, so parity tests see every parameter
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def write_config(path: Path, model_dir: str, sae_dir: str, feature: int = 0, **search) -> Path:
    """A config.toml naming a local model and SAE (paths relative to the config's folder)."""
    lines = ["[model]", f'path = "{model_dir}"', "", "[sae]", f'path = "{sae_dir}"', "",
             "[feature]", f"index = {feature}", "", "[search]"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in search.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def liveliest_feature(config_path: Path) -> int:
    """The latent that fires on most tokens of the built-in paragraph: a lively default feature."""
    import numpy as np

    from epo_tui.config import load_config
    from epo_tui.engine.pairing import as_batch, load_model_with_sae
    from epo_tui.engine.sae import activations

    pair = load_model_with_sae(load_config(str(config_path)))
    fires_S = 0
    for line in _CORPUS.splitlines():
        _, sae_in_1xLxD = pair.forward(as_batch(pair.model.encode(line)), logits=False)
        fires_S = fires_S + (np.asarray(activations(pair.sae, sae_in_1xLxD[0])) > 0).sum(axis=0)
    return int(np.argmax(fires_S))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epo_tui.engine.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--family", choices=FAMILIES, default="gpt2")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="standard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from epo_tui.engine.sae_writer import write_random_sae

    write_tiny_checkpoint(args.folder / "model", args.family, seed=args.seed)
    # input_norm: the tiny model's residual norm (about 0.65), so a good share of latents fire on text
    write_random_sae(args.folder / "sae", d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_pre",
                     architecture=args.architecture, seed=args.seed, input_norm=0.65)
    config = write_config(args.folder / "config.toml", "model", "sae", feature=0,
                          iterations=20, elites=4, candidates=16, prompt_tokens=6, topk=32)
    feature = liveliest_feature(config)
    write_config(config, "model", "sae", feature=feature,
                 iterations=20, elites=4, candidates=16, prompt_tokens=6, topk=32)
    print(f"wrote {args.folder}/model, {args.folder}/sae and {config}\n"
          f"try: epo-tui score --config {config} \"The quick brown fox\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
