"""train.py's setup: the data (formats, masks, packing), the model (4-bit base, new chat tokens,
LoRA, the speed layer, activation checkpointing) and the memory plan (--auto-batch,
--grad-ckpt auto), each as train.py's config asks."""

import sys

import fast
import lora
import quant
from training import data, grad_ckpt, loss, memory_plan
from training.auto_batch import auto_batch_size, longest_rows_probe
from training.distributed import say
from training.inputs import parse_targets
from training.new_tokens import grow_vocabulary, train_embedding_rows


def setup_data(cfg, tokenizer):
    """(train rows, eval rows, collate for train rows, added token ids, data stats)."""
    train_samples, eval_rows, stats = data.prepare(
        cfg.data, tokenizer, fmt=cfg.format, max_len=cfg.max_len, train_on_prompt=cfg.train_on_prompt,
        eval_split=cfg.eval_split, eval_data=cfg.eval_data or None, seed=cfg.seed, force_chatml=cfg.add_chatml_tokens,
        columns=cfg.columns, roles=cfg.roles, data_field=cfg.data_field, response_marker=cfg.response_marker,
        prompt_marker=cfg.prompt_marker)
    for notice in stats["notices"]:
        say(f"note: {notice}", file=sys.stderr)
    t = stats["train"]
    say(f"data {cfg.data} ({stats['format']}): {t['samples']:,} train samples, {len(eval_rows):,} eval, "
        f"{t['tokens']:,} tokens ({t['target_tokens']:,} with loss); {t['truncated']} truncated to "
        f"--max-len {cfg.max_len}, {t['dropped']} dropped for having no target left")
    rows = data.pack(train_samples, cfg.max_len) if cfg.packing else train_samples
    collate = data.collate_packed if cfg.packing else data.collate
    return rows, eval_rows, collate, stats["new_token_ids"], stats


def build_model(cfg, tokenizer, added_tokens, device, resume_from=None):
    model = quant.load_model(cfg.model, quant=None if cfg.quant == "none" else cfg.quant,
                             double_quant=cfg.double_quant, compute_dtype=quant.DTYPES[cfg.dtype], device=device,
                             trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False  # no KV cache while training: it only costs memory
    model.set_attn_implementation(cfg.attention)
    # Before LoRA goes on: transformers resizes the plain embedding and head modules only.
    grow_vocabulary(model, len(tokenizer))
    if resume_from:  # the checkpoint's adapter config says where LoRA goes; its weights replace the fresh init
        wrapped = lora.load_adapter(model, resume_from)
    else:
        wrapped = lora.inject(model, parse_targets(cfg.targets), r=cfg.lora_r, alpha=cfg.lora_alpha,
                              dropout=cfg.lora_dropout, rslora=cfg.rslora)
    modules_to_save = train_embedding_rows(model, len(tokenizer) - len(added_tokens), bool(added_tokens),
                                           cfg.train_embeddings)
    if cfg.fast:
        fast.enable(model)
    if cfg.grad_ckpt != "off":  # auto: every layer checkpointed until train() plans
        grad_ckpt.enable(model.get_decoder().layers, offload=cfg.offload_activations, mlp_chunk=cfg.mlp_chunk)
    return model, wrapped, modules_to_save


def fit_memory(cfg, model, rows, batch_of, step, device, resumed):
    """--auto-batch, then --grad-ckpt auto's plan (None when there is none), both from probe steps:
    `step(batch)`, forward and backward of the n longest rows, random state forked, gradients dropped."""
    probe = longest_rows_probe(step, model, rows, batch_of, device)
    if cfg.auto_batch and not resumed:  # a resumed run keeps the sizes its train_config.json recorded
        cfg.batch_size, cfg.grad_accum, largest = auto_batch_size(probe, cfg.batch_size, cfg.grad_accum)
        say(f"--auto-batch: a micro-batch of {largest} of the longest samples fits; using --batch-size "
            f"{cfg.batch_size} --grad-accum {cfg.grad_accum} (effective batch {cfg.batch_size * cfg.grad_accum})")
    if cfg.grad_ckpt != "auto" or device.type != "cuda":
        return None
    # A probe step of the longest micro-batch measures the full-checkpointing peak and one layer's
    # activations; the last layers that fit the budget then keep theirs (training/memory_plan.py).
    # It runs after --auto-batch, which sized the micro-batch with every layer checkpointed, and
    # spends what that leaves. Gradients do not depend on the plan.
    trainable = [p for p in model.parameters() if p.requires_grad]
    plan = memory_plan.apply(model.get_decoder().layers, lambda: probe(cfg.batch_size),
                             budget=int(cfg.memory_budget * 2**30), offload=cfg.offload_activations,
                             unseen=memory_plan.unseen_bytes(trainable, cfg.optim, cfg.grad_accum),
                             dense_dtype=quant.DTYPES[cfg.dtype], loss_head=model.get_output_embeddings(),
                             loss_bytes=loss.kept_bytes(cfg.batch_size * max(len(r["input_ids"]) for r in rows),
                                                        model.config.vocab_size))
    say(plan.summary())
    return plan
