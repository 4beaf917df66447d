"""Tiny models and tokenizers built locally, for the embedded default and the tests.

Nothing here is downloaded: the tokenizer is a byte-level BPE trained on a few lines of
text, the models are random initialisations of real transformers architectures at toy
sizes. Every architecture rawqlora supports has a tiny config here, so the tests cover
Llama, Mistral, Qwen2 and Mixtral with the same code.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from training.data import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CONFIG_CLASSES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "mixtral": MixtralConfig,
}


def train_tokenizer(texts, vocab_size=512, chat_template=True, chatml_tokens=True):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers.

    `chatml_tokens=False` leaves `<|im_start|>`/`<|im_end|>` out of the vocabulary, and
    `chat_template=False` leaves the template out: the two cases train.py must repair.
    """
    specials = SPECIAL_TOKENS if chatml_tokens else SPECIAL_TOKENS[:3]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(arch, vocab_size, hidden_size=64, layers=2, heads=4, kv_heads=2, **overrides):
    """A toy-sized config of a real architecture (grouped-query attention on, as in the real models)."""
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {sorted(CONFIG_CLASSES)}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    kwargs.update(overrides)
    return CONFIG_CLASSES[arch](**kwargs)


def tiny_model(arch, vocab_size, seed=0, dtype=torch.float32, **config_overrides):
    """A randomly initialised tiny model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, **config_overrides)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)
