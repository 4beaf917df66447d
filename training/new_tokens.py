"""Rows for tokens the data adds to the vocabulary (ChatML's <|im_start|>/<|im_end|> on a base
model that has no chat template): grown before LoRA goes on, trained row by row."""

import torch


def grow_vocabulary(model, vocab):
    """Give added tokens embedding and head rows, each new row the mean of the old ones.

    A new row initialised to the mean embedding starts as an "average token" instead of
    noise, so the first steps do not spike the loss (Hewitt, "Initializing New Word
    Embeddings for Pretrained Language Models", 2021). Called before LoRA is injected:
    transformers resizes only plain embedding and head modules. Not its mean_resizing, which
    samples around the mean (covariance scaled by 1e-9) and says so on stderr: the mean, exactly.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if vocab <= old:
        return
    model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):  # tied: the same rows twice
            weight = module.weight
            weight[old:] = weight[:old].float().mean(0).to(weight.dtype)


def train_embedding_rows(model, old_vocab, tokens_added, train_all):
    """Make the embedding rows of added tokens trainable (all rows with `train_all`).

    Only the new rows learn, unless `train_all`: a gradient hook zeroes the others, and
    weight decay is off for them (train.py's optimizer groups). An output head that is itself a
    LoRA target trains its new rows in its base weight, which lora.save_adapter then saves beside
    the head's LoRA weights (as PEFT saves a targeted embedding layer). Returns the module names
    to save whole with the adapter (PEFT's modules_to_save).
    """
    if not tokens_added and not train_all:
        return []
    names = []
    head = model.get_output_embeddings()
    for module in (model.get_input_embeddings(), getattr(head, "base_layer", head)):
        # fp32 master weights: Adam updates of ~1e-4 vanish when added to bf16 values.
        module.weight.data = module.weight.data.float()
        module.weight.requires_grad_(True)
        if not train_all:
            frozen = torch.zeros(module.weight.shape[0], 1, dtype=torch.bool, device=module.weight.device)
            frozen[: min(old_vocab, module.weight.shape[0])] = True
            module.weight.register_hook(lambda g, frozen=frozen: g.masked_fill(frozen, 0))
        if module is not getattr(head, "base_layer", None):  # a LoRA head is saved with its adapter
            names.append(next(n for n, m in model.named_modules() if m is module).split(".")[-1])
    return names
