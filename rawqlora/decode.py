"""Our decode loop: prefill a left-padded batch once, then one token per step from a KV cache.

    prompts ─ left-pad ─▶ forward(every prompt token) ─▶ last logits ─▶ pick ─▶ token 1
                               │ fills the KV cache
    token t ─▶ forward(token t, cache) ─▶ logits ─▶ pick ─▶ token t+1    until every prompt
                                                                         stopped or max_new_tokens
    pick = repetition penalty ─▶ temperature 0: argmax
                                 otherwise: ÷ temperature ─▶ top-k ─▶ top-p ─▶ sample (seeded)

Two caches, one loop. The static cache (rawqlora/static_cache.py) holds every column the
decode will need from the start, so the one-token step has the same shapes and addresses at
every step; on CUDA that step (forward, pick, stop bookkeeping, all on the GPU) is captured
once in a CUDA graph and replayed (rawqlora/cuda_graph.py), which takes Python off the path of
each token. transformers' `DynamicCache` grows by a column each step; it serves the CPU, the
attention implementations that take no prepared mask (flash, flex) and sequences longer than
a sliding window.

                  CPU        CUDA
    cache         dynamic    static
    prefill       eager      eager (compile_prefill=True: a kept decoder's later prefills compiled,
                             for any prompt length, then captured per prompt width; eager, the
                             host's time per operation is most of the time to first token)
    decode step   eager      eager for 2 steps, then captured once and replayed (when it pays;
                             with compile=True, compiled before the capture, attention
                             in its one-token form: rawqlora/decode_attention.py)
    step's sdpa   torch's    memory-efficient: the same numbers every run (STEP_SDPA_BACKENDS)

Either way the loop's state lives in tensors on the model's device (`_Decoder`): the token to
feed, its position, which rows have ended, which tokens each row has seen. Each step writes a
report [3, batch] (the token picked, whether the row had ended, whether the token is a stop
token), the only thing the host reads, one step behind on CUDA so the GPU never waits for it.

transformers provides only the architecture (the model's forward) and, for the dynamic cache,
the container; padding, positions, masks, sampling and stopping are here. The model is used
as given: put it in eval mode first (dropout would otherwise be on).
"""

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from rawqlora import cuda_graph, decode_attention
from rawqlora.static_cache import StaticCache, visible_columns

# On CUDA a step is captured only when at least this many steps remain after the eager
# warm-up ones (cuda_graph.WARMUP_STEPS): a capture costs about as much Python as two or three
# eager steps, and each replayed step saves most of one.
GRAPH_MIN_STEPS = 8
# Columns of a kept batch-1 decoder (chat turns, one prompt at a time) are rounded up to a
# multiple of this, so that turns of similar length replay the same graph.
KEPT_COLUMNS = 256
# Prompt widths whose compiled prefill a kept decoder keeps captured (compile_prefill=True).
PREFILL_GRAPHS = 8
# sdpa's kernels for the one-token decode steps on CUDA. Left to choose, torch reaches cuDNN's
# attention on an H200, whose one-token step at batch 8 and 32 sums in an order that changes
# from call to call: the same step from the same state differed in the attention output of one
# layer in most steps (by 1-2 bf16 ulps), so greedy decoding took another token at near-ties
# after tens of tokens and no two runs agreed, eager or replayed (bench/step_parity.py,
# bench/RESULTS.md session 8). The memory-efficient kernel repeated itself bit for bit there, at
# every step and whatever the number of cache columns; the math kernel, the fallback, repeats
# too. The prefill keeps torch's choice, transformers' own: with it our prompts' logits are
# theirs (the memory-efficient prefill parted from transformers' generate at token 0).
STEP_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Compiled code rounds to the model's dtype wherever the eager code does (a bf16 rotary, an
# activation), not once at the end of each fused kernel, so that it stays close to the eager loop.
# One run each (bench/RESULTS.md, session 12): GPTQ's compiled decode parted from the eager loop's
# tokens at a 6-ulp logit gap without it, at a 4-ulp near-tie with it; bf16's still parts at 6 ulps
# (0.22 in session 6, before either).
COMPILE_OPTIONS = {"emulate_precision_casts": True}


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
    prefill_seconds: float  # the prompt forward pass, up to the first new token on the host
    decode_seconds: float  # every step after that (a graph capture included)
    cache: str = "dynamic"  # "static" or "dynamic"
    graph: bool = False  # whether decode steps replayed a CUDA graph
    # of decode_seconds, spent capturing the step's graph (0 when kept from an earlier call) and, with
    # compile_prefill, the prefill's for a new prompt width
    capture_seconds: float = 0.0

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


# ----------------------------------------------------------------------------- picking a token


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


def sample(probs, generator):
    """One draw per row from `probs` [batch, vocab]: argmax_i p_i / E_i with E_i ~ Exp(1) iid.

    The exponential race: P(i wins) = p_i / Σp, an exact draw. It is torch.multinomial's own
    algorithm for a single draw (the same generator state draws the same tokens), without its
    input checks, which read the min, max and row sums back to the host (`.item()`) and so
    cannot run inside a captured step. E is clamped above 0 so that a token of probability 0
    (filtered out) can never win through 0 / 0.
    """
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


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
    return sample(logits.softmax(dim=-1), generator)


# ----------------------------------------------------------------------------- the loop's state


# End-of-turn tokens of common chat templates (ChatML, Llama 3, Phi-3, Gemma, Llama 2 / Mistral),
# stop tokens whenever the vocabulary has them: a chat model ends its reply with one, which is
# not always its EOS.
END_OF_TURN = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>"]


def stop_ids(tokenizer, model):
    """EOS (the tokenizer's and the model's generation config's) and any end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(i for i in ids if i is not None)


def cache_argument(model):
    # transformers renamed the forward's `past_key_values` to `cache` (the old name now warns
    # of its removal); older releases know only the old name.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Decoder:
    """The state of one decode on the model's device, changed only in place by `_advance`."""

    def __init__(self, model, batch, sampling, stop_ids, pad_id):
        device = model.device
        self.model, self.sampling, self.pad_id = model, sampling, pad_id
        self.cache_arg = cache_argument(model)
        # What the host reads after each step: the token each row picked, whether the row had
        # ended before this step, whether the token is a stop token. The picked token is also
        # the token fed next (`tok` is a view of that row).
        self.report = torch.zeros(3, batch, dtype=torch.long, device=device)
        self.tok = self.report[0].unsqueeze(1)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the position of `tok`
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        self.seen = None  # [batch, vocab] bool under a repetition penalty, made at prefill
        self.generator = torch.Generator(device=device)
        self.stream = None  # the CUDA stream the decode runs on (static decoders on CUDA)

    def _forward(self, ids, mask, positions):
        # logits_to_keep=1: only the last position's logits are needed, which saves a
        # [batch, prompt, vocab] tensor at prefill. Sampling happens in fp32 whatever the model dtype.
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         **{self.cache_arg: self.cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _first(self, ids, mask, positions, logits):
        """Reset the state for the prompts `ids` (their prefill gave `logits`), and pick token 1."""
        if self.sampling.repetition_penalty != 1.0:
            # Which tokens the prompts hold: real tokens only, not the left padding.
            counts = torch.zeros_like(logits).scatter_add_(1, ids, mask.to(logits.dtype))
            if self.seen is None or self.seen.shape != counts.shape:
                self.seen = counts > 0
            else:
                self.seen.copy_(counts > 0)
        self.finished.zero_()
        self.pos.copy_(positions[:, -1:])
        self._advance(logits)

    def _advance(self, logits):
        """Pick each row's next token from `logits`, report it, and make it the token fed next."""
        next_ids = pick(logits, self.seen, self.sampling, self.generator)
        # Once a row has ended it is fed `pad_id` until the whole batch ends; nothing of it is reported.
        next_ids.masked_fill_(self.finished, self.pad_id)
        self.report[1].copy_(self.finished)
        if len(self.stop):
            is_stop = (next_ids[:, None] == self.stop).any(dim=-1)
            self.report[2].copy_(is_stop)
            self.finished.logical_or_(is_stop)  # a row that had ended stays ended, whatever its pad is
        self.report[0].copy_(next_ids)  # = tok
        if self.seen is not None:
            self.seen.scatter_(1, self.tok, True)
        self.pos.add_(1)


class DynamicDecoder(_Decoder):
    """transformers' DynamicCache and a 2-D padding mask, both one column longer each step."""

    kind = "dynamic"

    def prefill(self, ids, mask):
        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask
        # Positions count real tokens only (pads sit at 0, masked anyway), so a left-padded prompt
        # gets the positions, and therefore the rotary embeddings, it would get alone.
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        self._first(ids, mask, positions, self._forward(ids, mask, positions))

    def step(self):
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=-1)
        self._advance(self._forward(self.tok, self.mask, self.pos))


class StaticDecoder(_Decoder):
    """A StaticCache of `columns` columns, the masks built on the device from the current column.

    Column c of the cache holds what was fed at column c: the left-padded prompts in [0, P),
    the token fed at decode step s in column P + s - 1. `col` is the column of the token fed
    next; the step advances it in place, so a replay of the captured step carries on.
    """

    kind = "static"

    def __init__(self, model, batch, sampling, stop_ids, pad_id, columns):
        super().__init__(model, batch, sampling, stop_ids, pad_id)
        device = model.device
        self.columns = columns
        self.cache = StaticCache(model.config.num_hidden_layers, columns)
        self.all_columns = torch.arange(columns, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.real = torch.zeros(batch, columns, dtype=torch.bool, device=device)  # not left padding
        # sdpa takes a boolean mask (True = attend); the eager attention adds a float one.
        self.additive_mask = model.config._attn_implementation == "eager"
        self.run_step = self.eager_step  # what step() runs and a capture records: eager_step, or it compiled
        self.graph = None
        # The prefill's forward compiled for any prompt length (a kept decoder, compile_prefill=True),
        # used once the cache exists: the first prefill allocates it, eagerly (StaticCache.update).
        self.compiled_forward = None
        self.prefill_compiled = False  # whether a prefill has run (and so traced) compiled_forward
        # ... and captured per prompt width (capture_prefill), replayed for later prompts of that width:
        # width -> (graph, its static inputs (ids, mask, positions), its logits). None: not tried, or failed.
        self.prefill_graphs = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)

    def _mask(self, visible):
        if not self.additive_mask:
            return visible
        dtype = self.model.get_input_embeddings().weight.dtype
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
            ~visible, torch.finfo(dtype).min)

    def _prefill_inputs(self, ids, mask):
        """The forward's (ids, mask, positions) for the left-padded prompts `ids`, the cache set to take them."""
        width = ids.shape[1]
        self.real.fill_(True)  # the decode columns each hold a token fed
        self.real[:, :width] = mask.bool()
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # as the dynamic decoder's
        prompt_columns = self.all_columns[:width]
        self.cache.columns, self.cache.length = prompt_columns, width  # the prompt sees only its own columns
        visible = visible_columns(self.real[:, :width], prompt_columns, prompt_columns)
        return ids, self._mask(visible), positions

    def _decoding(self):
        """The cache set back for decode steps: every column, written at `col`."""
        self.cache.columns, self.cache.length = self.col, self.columns

    def prefill(self, ids, mask):
        inputs = self._prefill_inputs(ids, mask)
        captured = self.prefill_graphs and self.prefill_graphs.get(ids.shape[1])
        if captured:
            graph, static_inputs, logits = captured
            for static, given in zip(static_inputs, inputs):
                static.copy_(given)
            graph.replay()
        else:
            forward = self._forward
            if self.compiled_forward is not None and self.cache.allocated:
                forward, self.prefill_compiled = self.compiled_forward, True
            logits = forward(*inputs)
        self._decoding()
        self.col.fill_(ids.shape[1])
        self._first(ids, mask, inputs[2], logits)

    def capture_prefill(self, ids, mask):
        """Capture the compiled prefill of prompts as wide as `ids` (after it has run at this width, so
        that nothing is compiled or set up lazily inside the capture): later prompts of that width
        replay it, without the host's time per kernel. Keeps the last PREFILL_GRAPHS widths, in one
        memory pool (a replay's logits are read before any other replay). A failed capture warns
        and ends the capturing for this decoder. Returns the seconds it took (0: nothing captured)."""
        width = ids.shape[1]
        if self.prefill_graphs is None or width in self.prefill_graphs:
            return 0.0
        begin = time.perf_counter()
        inputs = tuple(t.clone() for t in self._prefill_inputs(ids, mask))  # the replays' inputs, in place
        out = []
        try:
            graph = cuda_graph.capture(lambda: out.append(self.compiled_forward(*inputs)), self.stream,
                                       pool=self.prefill_pool)
        except Exception as e:  # noqa: BLE001 (any failure means: prefill as before)
            self.prefill_graphs = None
            cuda_graph.failed("the prefill", e, "prefilling without one")
            return 0.0
        finally:
            self._decoding()
        if len(self.prefill_graphs) == PREFILL_GRAPHS:
            del self.prefill_graphs[next(iter(self.prefill_graphs))]  # the oldest width
        self.prefill_graphs[width] = (graph, inputs, out[0])
        return time.perf_counter() - begin

    def eager_step(self):
        """One decode step with nothing but in-place updates and no host reads: what is captured."""
        visible = visible_columns(self.real, self.col, self.all_columns)
        self._advance(self._forward(self.tok, self._mask(visible), self.pos))
        self.col.add_(1)

    def step(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run_step()


def static_unsupported(model, columns):
    """Why the static cache cannot decode `columns` columns of `model`, or None if it can."""
    attention = model.config._attn_implementation
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} takes no prepared 4-D mask (sdpa and eager do)"
    window = getattr(model.config, "sliding_window", None)
    if window is not None and columns > window:
        # The mask here has no window: beyond it the dynamic cache (transformers' sliding layers) is right.
        return f"{columns} columns exceed the model's sliding window of {window}"
    return None


# ----------------------------------------------------------------------------- generate


class _HostReports:
    """On the CPU a step's report is read as soon as it is computed."""

    lag = 0

    def __init__(self):
        self.queue = []

    def push(self, report):
        self.queue.append(report.tolist())

    def pop(self):
        return self.queue.pop(0)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, stop_ids=(), pad_id=0, sampling=None, on_step=None, *,
             cache=None, graph=None, compile=False, compile_prefill=False):
    """Generate from a batch of prompts (lists of token ids) with an HF causal LM's forward.

    stop_ids: a sequence ends at the first of these it emits (EOS, the chat template's
        end-of-turn token); that token is not part of its output. Once a sequence has ended
        it is fed `pad_id` until the whole batch ends, and its output ignores those steps.
    on_step: called after every step with one entry per prompt: the new token id, or None
        for a prompt that has ended (this step or earlier). For streaming; on CUDA it runs
        while the GPU computes the next step.
    cache: "static", "dynamic", or None: on CUDA static where it applies (sdpa or eager
        attention, within any sliding window), else dynamic.
    graph: capture the decode step in a CUDA graph (static cache on CUDA, no autocast). None:
        where it pays, i.e. on CUDA, in eval mode, with more than cuda_graph.WARMUP_STEPS +
        GRAPH_MIN_STEPS new tokens, for models without mixture-of-experts routing; a failed
        capture then warns and decodes eagerly (True raises). A batch-1 decoder with its graph
        is kept for the next call with the same settings (`cuda_graph.release(model)` frees it).
    compile: before capturing, compile the decode step with torch.compile, which fuses its
        small kernels (norms, rotary, activations); on CUDA, not with graph=False, and only where
        the step is captured (graph=None skips both for short outputs). The first call with a new
        decoder pays the compile (tens of seconds for a 7B model); a kept decoder keeps it.
        Fused kernels round differently: greedy tokens can part from the eager loop's at near-ties.
    compile_prefill: with compile, a kept (batch-1) decoder also compiles its prefill, for any
        prompt length, and prefills with it from its second call on; the first call prefills
        eagerly (the cache does not exist yet), then once more compiled, which pays that compile
        (one to three minutes more for a 7B model on an H200 host). After each call whose prompt
        width is new, the compiled prefill of that width is captured in a CUDA graph (the last
        PREFILL_GRAPHS widths are kept), which later prompts of that width replay. Worth it for a
        decoder that serves many prompts, not for one (bench/RESULTS.md, sessions 12 and 13).
    """
    if not prompts or not all(prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if cache not in (None, "static", "dynamic"):
        raise ValueError(f"cache must be 'static', 'dynamic' or None, not {cache!r}")
    sampling = sampling or Sampling()
    device = model.device
    on_cuda = device.type == "cuda"
    width = max(len(p) for p in prompts)
    needed = width + max_new_tokens - 1  # prompt columns, then one per step that feeds a token

    why_not = static_unsupported(model, needed)
    if cache == "static" and why_not:
        raise ValueError(f"cache='static' cannot decode this: {why_not}")
    # On the CPU the dynamic cache: as fast as the static one at equal lengths, and faster when a
    # large max_new_tokens ends early (the static one attends over every column it allocated).
    cache = cache or ("static" if on_cuda and not why_not else "dynamic")
    autocast = on_cuda and torch.is_autocast_enabled("cuda")
    if graph and not (on_cuda and cache == "static" and not autocast):
        # Autocast caches its casts of the weights until its region ends: a graph would keep
        # reading them after that (and PyTorch requires its cache off during a capture).
        raise ValueError("graph=True needs the model on a CUDA device, the static cache, and no autocast")
    required = bool(graph)  # asked for: a failed capture is an error, not a quiet fallback
    if compile and (graph is False or not on_cuda):
        raise ValueError("compile=True compiles the step the CUDA graph captures: it needs graph (on CUDA)")
    if compile_prefill and not compile:
        raise ValueError("compile_prefill=True compiles the prefill of a compiled decoder: it needs compile=True")
    if graph is None:
        graph = (on_cuda and cache == "static" and not model.training and not autocast
                 and max_new_tokens > cuda_graph.WARMUP_STEPS + GRAPH_MIN_STEPS and cuda_graph.capturable(model))
    compile = compile and graph  # where no graph pays (a short output), nothing is compiled either

    decoder = _decoder(model, prompts, needed, sampling, stop_ids, pad_id, cache, graph, compile,
                       compile and compile_prefill)
    decoder.model = model
    if sampling.seed is None:
        decoder.generator.seed()
    else:
        decoder.generator.manual_seed(sampling.seed)
    outer = torch.cuda.current_stream(device) if on_cuda else None
    if decoder.stream is not None:
        decoder.stream.wait_stream(outer)  # the weights may still be being written on the caller's stream
    try:
        with torch.cuda.stream(decoder.stream) if decoder.stream is not None else nullcontext():
            out = _run(decoder, prompts, max_new_tokens, pad_id, on_step, graph, on_cuda, required)
    finally:
        decoder.model = None  # a kept decoder must not keep the model alive
        if decoder.stream is not None:
            outer.wait_stream(decoder.stream)
            if getattr(decoder, "graph", None) is not None:
                # A step launched after the batch had ended may still be replaying; a graph
                # dropped now (not kept) would free its memory pool under it.
                decoder.stream.synchronize()
    out.cache = decoder.kind
    return out


def _decoder(model, prompts, needed, sampling, stop_ids, pad_id, cache, graph, compile=False, compile_prefill=False):
    """A new decoder, or on CUDA the batch-1 one kept from an earlier call with the same settings."""
    batch = len(prompts)
    if cache == "dynamic":
        return DynamicDecoder(model, batch, sampling, stop_ids, pad_id)
    if not graph:
        return StaticDecoder(model, batch, sampling, stop_ids, pad_id, needed)
    # Rounded up: a multiple of 64 columns suits the attention kernels; a kept decoder's columns
    # are rounded further, so the next turn of a chat fits it too. Masked columns cost the
    # attention a read of their keys and values per step, small beside the weights at batch 1.
    step = KEPT_COLUMNS if batch == 1 else 64
    columns = math.ceil(needed / step) * step
    decoder = key = None
    if batch == 1:
        key = (columns, sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty,
               tuple(sorted(set(stop_ids))), pad_id, compile, compile_prefill, cuda_graph.fingerprint(model))
        decoder = cuda_graph.kept(model, key)
    if decoder is None:
        decoder = StaticDecoder(model, batch, sampling, stop_ids, pad_id, columns)
        if compile:
            # dynamic=False: the step's shapes never change. The first calls (the eager warm-up
            # steps before the capture) compile; the capture records the compiled kernels.
            decoder.run_step = torch.compile(decoder.eager_step, dynamic=False, options=COMPILE_OPTIONS)
            if model.config._attn_implementation == "sdpa":
                # sdpa's one-token form, compiled with the step (rawqlora/decode_attention.py)
                decoder.run_step = decode_attention.routed(decoder, decoder.run_step)
        if key is not None:
            cuda_graph.keep(model, key, decoder)
            if compile_prefill:  # kept, so later calls prefill with it; traced once with the length symbolic
                decoder.compiled_forward = torch.compile(decoder._forward, dynamic=True, options=COMPILE_OPTIONS)
                decoder.prefill_graphs, decoder.prefill_pool = {}, torch.cuda.graph_pool_handle()
    return decoder


def _run(decoder, prompts, max_new_tokens, pad_id, on_step, graph, on_cuda, required=False):
    """The host's loop: launch each step, read each report (one step behind on CUDA), stop."""
    tokens = [[] for _ in prompts]
    stopped = [False] * len(prompts)

    def read(report):
        """Record one step's report; True once every row has ended."""
        step = []
        for row, (token, had_ended, is_stop) in enumerate(zip(*report)):
            emitted = not had_ended and not is_stop
            if emitted:
                tokens[row].append(token)
            stopped[row] = stopped[row] or (not had_ended and bool(is_stop))
            step.append(token if emitted else None)
        if on_step is not None:
            on_step(step)
        return all(s is None for s in step)

    if on_cuda:
        reports = cuda_graph.PinnedReports(len(prompts))
    else:
        reports = _HostReports()
    ids, mask = left_pad(prompts, pad_id, decoder.model.device)
    start = time.perf_counter()
    decoder.prefill(ids, mask)
    reports.push(decoder.report)
    done = read(reports.pop())
    prefill_seconds = time.perf_counter() - start

    capture_seconds, launched, read_steps = 0.0, 1, 1
    with sdpa_kernel(STEP_SDPA_BACKENDS) if on_cuda else nullcontext():
        while not done and launched < max_new_tokens:
            if graph and decoder.graph is None and launched > cuda_graph.WARMUP_STEPS:
                begin = time.perf_counter()
                decoder.graph = cuda_graph.try_capture(decoder.model, decoder.run_step, decoder.stream,
                                                       decoder.generator if decoder.sampling.temperature else None,
                                                       required)
                capture_seconds = time.perf_counter() - begin
                graph = decoder.graph is not None
            decoder.step()
            reports.push(decoder.report)
            launched += 1
            if launched - read_steps > reports.lag:
                done = read(reports.pop())
                read_steps += 1
    while not done and read_steps < launched:
        done = read(reports.pop())
        read_steps += 1
    if getattr(decoder, "compiled_forward", None) is not None:
        if not decoder.prefill_compiled:
            # The first call of a kept decoder with compile_prefill prefilled eagerly (its cache did not
            # exist). Prefill once more now, compiled: the compile is paid here, with the step's, and
            # not by the next call. It overwrites cache columns the next prefill writes again.
            decoder.prefill(ids, mask)
        capture_seconds += decoder.capture_prefill(ids, mask)  # for the next prompt of this width
    total = time.perf_counter() - start
    return Output(tokens=tokens, stopped=stopped, prompt_tokens=sum(len(p) for p in prompts),
                  prefill_seconds=prefill_seconds, decode_seconds=total - prefill_seconds,
                  graph=getattr(decoder, "graph", None) is not None, capture_seconds=capture_seconds)
