"""Our decode loop: prefill a left-padded batch once, then one token per step from a KV cache.

    prompts ─ left-pad ─▶ forward(every prompt token) ─▶ last logits ─▶ pick ─▶ token 1
                               │ fills the KV cache
    token t ─▶ forward(token t, cache) ─▶ logits ─▶ pick ─▶ token t+1    until every prompt
                                                                         stopped or max_new_tokens
    pick = repetition penalty ─▶ temperature 0: argmax
                                 otherwise: ÷ temperature ─▶ top-k ─▶ top-p ─▶ sample (seeded)

transformers provides only the architecture (the model's forward) and the container the forward
fills with keys and values (`DynamicCache`); padding, positions, sampling and stopping are here.
The model is used as given: put it in eval mode first (dropout would otherwise be on).
"""

import inspect
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Sampling:
    """How the next token is picked; the defaults are greedy decoding."""

    temperature: float = 0.0  # 0 = greedy argmax; otherwise sample from softmax(logits / temperature)
    top_k: int = 0  # sample only among the k most likely tokens; 0 = off
    top_p: float = 1.0  # sample only among the smallest set holding top_p of the probability; 1 = off
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already in prompt or output; 1 = off
    seed: int | None = None  # seeds the sampling generator, so a seed repeats; None = fresh randomness


@dataclass
class Output:
    """What `generate` returns, per prompt in the order given, plus the timing."""

    tokens: list[list[int]]  # generated ids: no prompt, no pad, and not the stop token that ended it
    stopped: list[bool]  # True where a stop token ended the sequence, False where max_new_tokens did
    prompt_tokens: int  # real prompt tokens over the batch (padding not counted)
    prefill_seconds: float  # the prompt forward pass, up to the first new token
    decode_seconds: float  # every step after that

    @property
    def new_tokens(self):
        return sum(len(t) for t in self.tokens)


def left_pad(prompts, pad_id, device=None):
    """Token lists -> (input_ids, attention_mask), padded on the left.

    Left, so that every prompt's last token sits in the last column: its logits are the ones
    we read, and each new token is appended in the same column for the whole batch.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty (Keskar et al. 2019, as in transformers): on the tokens in `seen`,
    divide positive logits by `penalty` and multiply negative ones, so both lose probability.

    logits: [batch, vocab] float; seen: [batch, vocab] bool.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits, k):
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th stay)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus filtering (Holtzman et al. 2019): keep the most likely tokens until their
    probability reaches p, -inf for the rest. The most likely token is always kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already hold p of the probability.
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick(logits, seen, sampling, generator):
    """The next token of every row: [batch, vocab] fp32 logits -> [batch] token ids."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, stop_ids=(), pad_id=0, sampling=None, on_step=None):
    """Generate from a batch of prompts (lists of token ids) with an HF causal LM's forward.

    stop_ids: a sequence ends at the first of these it emits (EOS, the chat template's
        end-of-turn token); that token is not part of its output. Once a sequence has ended
        it is fed `pad_id` until the whole batch ends, and its output ignores those steps.
    on_step: called after every step with one entry per prompt: the new token id, or None
        for a prompt that has ended (this step or earlier). For streaming.
    """
    if not prompts or not all(prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    sampling = sampling or Sampling()
    device = model.device
    ids, mask = left_pad(prompts, pad_id, device)
    # Positions count real tokens only (pads sit at 0, masked anyway), so a left-padded prompt
    # gets the positions, and therefore the rotary embeddings, it would get alone.
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    # transformers renamed the forward's `past_key_values` to `cache` (the old name now warns
    # of its removal); older releases know only the old name.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(input_ids):
        # logits_to_keep=1: only the last position's logits are needed, which saves a
        # [batch, prompt, vocab] tensor at prefill. Sampling happens in fp32 whatever the model dtype.
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            **{cache_arg: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    start = time.perf_counter()
    logits = forward(ids)
    seen = None
    if sampling.repetition_penalty != 1.0:
        # Which tokens the prompts hold: real tokens only, not the left padding.
        counts = torch.zeros_like(logits).scatter_add_(1, ids, mask.to(logits.dtype))
        seen = counts > 0

    tokens = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    prefill_seconds = None
    for step in range(max_new_tokens):
        next_ids = pick(logits, seen, sampling, generator)
        next_ids = next_ids.masked_fill(finished, pad_id)
        ends_now = torch.isin(next_ids, stop) & ~finished
        was_finished = finished.tolist()
        finished = finished | ends_now
        report = []
        for row, (token, ended) in enumerate(zip(next_ids.tolist(), ends_now.tolist())):
            if was_finished[row] or ended:
                stopped[row] = stopped[row] or ended
                report.append(None)
            else:
                tokens[row].append(token)
                report.append(token)
        if prefill_seconds is None:
            prefill_seconds = time.perf_counter() - start
        if on_step is not None:
            on_step(report)
        if all(finished.tolist()) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(len(prompts), device=device), next_ids] = True
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        logits = forward(next_ids[:, None])

    total = time.perf_counter() - start
    prefill_seconds = total if prefill_seconds is None else prefill_seconds
    return Output(
        tokens=tokens,
        stopped=stopped,
        prompt_tokens=int(mask[:, : ids.shape[1]].sum()),
        prefill_seconds=prefill_seconds,
        decode_seconds=total - prefill_seconds,
    )
