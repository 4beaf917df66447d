"""The decode loop's two caches (rawqlora/decode.py, rawqlora/static_cache.py) on the CPU.

The static cache is the one the CUDA graph captures; here it runs eagerly, the same code
minus the capture. Greedy comparisons are token-exact: the static and dynamic caches and
transformers' `generate` run the same forward on the same fp32 (or NF4) weights with the same
positions, and differ only in how many masked columns the attention reads, a difference of a
few ulps in the logits, far below the gap between the top two logits that argmax decides on.
The graph itself needs a GPU: bench/decode.py checks it there against the eager loop and
transformers.
"""

import pytest
import torch

import lora
from rawqlora import cuda_graph, decode
from rawqlora.decode import Sampling, generate, left_pad, sample
from rawqlora.static_cache import visible_columns
from reference import load_hf
from test_generate import EOS, N, PROMPTS  # the same prompts and lengths as the CLI's tests



@pytest.fixture(scope="module")
def encoded(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def llama(make_model_dir):
    return load_hf(make_model_dir("llama")).eval()


def cut(ids, stop=EOS):
    return ids[: ids.index(stop)] if stop in ids else ids


def hf_batch_greedy(model, prompts, n=N):
    """transformers' greedy outputs for a left-padded batch, each cut before EOS like ours."""
    ids, mask = left_pad(prompts, 0)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0)
    return [cut(row) for row in out[:, ids.shape[1] :].tolist()]


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("arch, nf4", [("llama", False), ("qwen2", False), ("mistral", False), ("llama", True)])
def test_static_greedy_equals_dynamic_and_transformers_batched(make_model_dir, encoded, arch, nf4):
    model = load_hf(make_model_dir(arch), nf4).eval()
    static = generate(model, encoded, N, [EOS], cache="static")
    dynamic = generate(model, encoded, N, [EOS], cache="dynamic")
    assert static.cache == "static" and dynamic.cache == "dynamic" and not static.graph
    assert static.tokens == dynamic.tokens == hf_batch_greedy(model, encoded)
    assert static.stopped == dynamic.stopped
    assert sum(map(len, static.tokens)) > 2 * N  # real outputs, not prompts that stop at once


def test_static_batch_equals_each_prompt_alone(llama, encoded):
    # Left padding shifts every prompt but the longest; pads are masked and positions count
    # real tokens only, so each row computes what it computes alone (a cache of its own width).
    alone = [generate(llama, [p], N, [EOS], cache="static").tokens[0] for p in encoded]
    assert generate(llama, encoded, N, [EOS], cache="static").tokens == alone


def test_eager_attention_takes_the_additive_mask(make_model_dir, encoded):
    model = load_hf(make_model_dir("llama")).eval()
    model.set_attn_implementation("eager")
    assert generate(model, encoded, N, [EOS], cache="static").tokens == hf_batch_greedy(model, encoded)


def test_static_with_unmerged_lora_equals_merged(make_model_dir, encoded):
    model = load_hf(make_model_dir("llama")).eval()
    lora.inject(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(0)
    for layer in lora.lora_modules(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # B away from zero: the adapter matters
    unmerged = generate(model, encoded, N, [EOS], cache="static").tokens
    for layer in lora.lora_modules(model).values():
        layer.merge()
    assert generate(model, encoded, N, [EOS], cache="static").tokens == unmerged
    assert unmerged != generate(load_hf(make_model_dir("llama")).eval(), encoded, N, [EOS]).tokens


# ----------------------------------------------------------------------------- stop tokens and streaming


@pytest.mark.parametrize("lag", [0, 1])
def test_stop_tokens_end_each_row_and_stream(llama, encoded, lag, monkeypatch):
    # lag=1 reads each report one step late, as on CUDA (PinnedReports): the same outputs and
    # the same stream of steps, and no step reported after the whole batch has ended.
    monkeypatch.setattr(decode._HostReports, "lag", lag)
    free = generate(llama, encoded[:3], N, cache="static").tokens
    # Row 0 stops at step k on a token it has not emitted before; row 1 never emits it; row 2
    # stops at its first token (the second stop id).
    k, stop = next((k, t) for k, t in enumerate(free[0]) if k >= 2 and t not in free[0][:k] and t not in free[1])
    assert free[2][0] not in free[0][:k] + free[1]
    steps = []
    out = generate(llama, encoded[:3], N, stop_ids=[stop, free[2][0]], cache="static", on_step=steps.append)
    assert out.tokens == [free[0][:k], free[1], []]  # the stop token itself is not in the output
    assert out.stopped == [True, False, True]
    assert len(steps) == N
    assert [s[0] for s in steps] == free[0][:k] + [None] * (N - k)  # None from the stop step on
    assert [s[1] for s in steps] == free[1]
    assert [s[2] for s in steps] == [None] * N


@pytest.mark.parametrize("lag", [0, 1])
def test_all_rows_stopped_ends_the_loop(llama, encoded, lag, monkeypatch):
    monkeypatch.setattr(decode._HostReports, "lag", lag)
    free = generate(llama, encoded, 3, cache="static").tokens
    # Two rows and two stop tokens: row a ends at step 1, row b at step 2, neither earlier.
    a, b = next((a, b) for a in range(4) for b in range(4) if a != b
                and free[a][1] not in free[a][:1] + free[b][:2] and free[b][2] not in free[a][:1] + free[b][:2])
    steps = []
    out = generate(llama, [encoded[a], encoded[b]], N, stop_ids=[free[a][1], free[b][2]], cache="static",
                   on_step=steps.append)
    assert out.tokens == [free[a][:1], free[b][:2]] and out.stopped == [True, True]
    assert steps == [[free[a][0], free[b][0]], [None, free[b][1]], [None, None]]


def test_streaming_sees_each_step_before_the_next(llama, encoded):
    # on_step runs inside the loop: at the step-s call, exactly s + 1 steps have been reported.
    calls = []
    out = generate(llama, [encoded[1]], N, cache="static", on_step=lambda s: calls.append(s[0]))
    assert calls == out.tokens[0] and len(calls) == N


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_repeats_and_both_caches_draw_alike(llama, encoded):
    settings = Sampling(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)

    def run(cache, **change):
        return generate(llama, encoded, N, sampling=Sampling(**{**vars(settings), **change}), cache=cache).tokens

    first = run("static")
    assert run("static") == first
    # One sampler, one generator, one draw per step: the caches differ in masked columns only.
    assert run("dynamic") == first
    assert run("static", seed=8) != first
    assert run("static", temperature=0.0) != first  # it did sample


def test_sample_draws_from_the_distribution_as_multinomial_does():
    # The exponential race is an exact draw: 200,000 draws of a 5-way distribution land within
    # 5 standard errors of each probability; a token of probability 0 is never drawn.
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    draws = sample(probs.expand(200_000, 5), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    se = (probs.double() * (1 - probs.double()) / len(draws)).sqrt()
    assert (freq - probs.double()).abs().le(5 * se + 1e-12).all(), freq
    assert freq[4] == 0
    # It is torch.multinomial's single-draw algorithm: the same seed draws the same tokens, so
    # seeds kept their meaning when the loop stopped calling multinomial (whose checks sync).
    probs = torch.softmax(torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    ours = sample(probs, torch.Generator().manual_seed(2))
    theirs = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(2)).squeeze(-1)
    assert torch.equal(ours, theirs)


def test_top_k_1_is_greedy_on_both_caches(llama, encoded):
    greedy = generate(llama, encoded, N, [EOS]).tokens
    for cache in ("static", "dynamic"):
        sampled = generate(llama, encoded, N, [EOS], sampling=Sampling(temperature=1.0, top_k=1, seed=0), cache=cache)
        assert sampled.tokens == greedy


# ----------------------------------------------------------------------------- the static cache


def test_visible_columns_by_hand():
    real = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    cols = torch.arange(5)
    prefill = visible_columns(real[:, :3], cols[:3], cols[:3])  # a 3-column prompt, row 0 left-padded once
    assert prefill.shape == (2, 1, 3, 3)
    assert prefill[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert prefill[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    step = visible_columns(real, torch.tensor([3]), cols)  # the token fed at column 3
    assert step[:, 0, 0].tolist() == [[False, True, True, True, False], [True, True, True, True, False]]


def test_cache_choice_and_refusals(make_model_dir, encoded):
    mistral = load_hf(make_model_dir("mistral", sliding_window=24)).eval()
    # On the CPU the dynamic cache unless asked; past a sliding window only the dynamic one.
    assert generate(mistral, encoded[:1], 4).cache == "dynamic"
    assert generate(mistral, encoded[:1], 4, cache="static").cache == "static"
    with pytest.raises(ValueError, match="sliding window of 24"):
        generate(mistral, encoded[:1], 40, cache="static")
    assert generate(mistral, encoded[:1], 40, [EOS]).tokens == hf_batch_greedy(mistral, encoded[:1], 40)
    with pytest.raises(ValueError, match="CUDA"):
        generate(mistral, encoded[:1], 4, graph=True)
    with pytest.raises(ValueError, match="needs graph"):
        generate(mistral, encoded[:1], 4, compile=True)
    with pytest.raises(ValueError, match="needs compile=True"):
        generate(mistral, encoded[:1], 4, compile_prefill=True)


def test_fingerprint_follows_what_a_kept_graph_reads(make_model_dir):
    model = load_hf(make_model_dir("llama")).eval()
    lora.inject(model, ["q_proj"], r=2, alpha=4)
    before = cuda_graph.fingerprint(model)
    assert cuda_graph.fingerprint(model) == before
    next(iter(lora.lora_modules(model).values())).merge()  # the forward takes another branch
    assert cuda_graph.fingerprint(model) != before
    merged = cuda_graph.fingerprint(model)
    model.lm_head.weight.data = model.lm_head.weight.data.clone()  # new memory under the same parameter
    assert cuda_graph.fingerprint(model) != merged
    assert cuda_graph.capturable(model)
    assert not cuda_graph.capturable(load_hf(make_model_dir("mixtral")))  # routed experts read back to the host


# ----------------------------------------------------------------------------- the graph path's loop, on the CPU


class Replay:
    """Stands in for a CUDA graph: capturing records the step without running it, as a capture
    does; replay() runs it."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()


def test_graph_loop_captures_after_the_warmup_and_keeps_the_decoder(llama, encoded, monkeypatch):
    captures = []

    def fake_capture(model, step, stream, generator=None, required=False):
        captures.append((step.__self__.col.item(), generator))
        return Replay(step)

    monkeypatch.setattr(cuda_graph, "try_capture", fake_capture)
    monkeypatch.setattr(decode._HostReports, "lag", 1)  # read one step behind, as on CUDA
    greedy, sampled = Sampling(), Sampling(temperature=0.9, top_p=0.9, seed=3)
    for sampling, prompts in [(greedy, encoded[:1]), (greedy, encoded[3:]), (sampled, encoded[:1]), (greedy, encoded)]:
        expected = generate(llama, prompts, N, [EOS], sampling=sampling, cache="static")
        width = max(map(len, prompts))
        decoder = decode._decoder(llama, prompts, width + N - 1, sampling, [EOS], 0, "static", graph=True)
        decoder.model = llama
        decoder.generator.manual_seed(sampling.seed or 0)
        steps = []
        out = decode._run(decoder, prompts, N, 0, steps.append, True, False)
        assert out.tokens == expected.tokens and out.stopped == expected.stopped and out.graph
        assert [s for s in steps if any(t is not None for t in s)] == [
            [row[i] if i < len(row) else None for row in out.tokens] for i in range(max(map(len, out.tokens)))]
    # Captured once per new decoder, after WARMUP_STEPS eager steps; the second batch-1 greedy call
    # (another prompt, same settings) reused the kept decoder and its graph; sampling registered
    # its generator.
    width0, width_all = len(encoded[0]), max(map(len, encoded))
    assert [c for c, _ in captures] == [width0 + cuda_graph.WARMUP_STEPS, width0 + cuda_graph.WARMUP_STEPS,
                                        width_all + cuda_graph.WARMUP_STEPS]
    assert captures[0][1] is None and captures[1][1] is not None
    kept = decode._decoder(llama, encoded[:1], 30, greedy, [EOS], 0, "static", graph=True)
    assert kept.columns == decode.KEPT_COLUMNS  # rounded up, so that chat turns of similar length share it
    cuda_graph.release(llama)


def test_stop_ids_are_eos_and_the_end_of_turn_token(tokenizer):
    """generate.py and the held-out questions stop at EOS and at the chat template's end of turn."""
    from rawqlora.decode import stop_ids
    from rawqlora.tiny import tiny_model

    model = tiny_model("llama", len(tokenizer))
    assert stop_ids(tokenizer, model) == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})


def test_compiled_prefill_is_used_once_the_cache_exists(llama, encoded):
    # compile_prefill=True on CUDA gives a kept decoder a prefill compiled with dynamic shapes. Here the same
    # switch with torch.compile's "eager" backend (dynamo's tracing, no code generation): the first
    # call prefills eagerly (allocating the cache), then once more through the compiled forward to
    # trace it; later prompts, of other lengths, run the traced one without retracing, and the
    # tokens are the eager decoder's.
    import torch._dynamo
    from torch._dynamo.utils import counters

    from rawqlora.decode import StaticDecoder, _run

    assert len({len(p) for p in encoded[:3]}) > 1  # prompts of several lengths
    torch._dynamo.reset()
    counters.clear()
    decoder = StaticDecoder(llama, 1, Sampling(), [EOS], 0, 64)
    decoder.model = llama
    decoder.compiled_forward = torch.compile(decoder._forward, dynamic=True, backend="eager")
    with torch.inference_mode():
        for prompt in encoded[:3]:
            out = _run(decoder, [prompt], N, 0, None, graph=False, on_cuda=False)
            assert out.tokens == generate(llama, [prompt], N, [EOS], cache="static").tokens
    assert decoder.prefill_compiled
    assert counters["stats"]["unique_graphs"] == 1  # traced once, for every prompt length


def test_compiled_prefill_is_captured_per_width_and_replayed(llama, encoded, monkeypatch):
    # compile_prefill=True captures the compiled prefill of each new prompt width after the call that
    # ran it, and replays it for later prompts of that width, with their own tokens copied into the
    # captured inputs. Here a stand-in graph (capturing runs the Python once, replay() again) and a
    # forward that writes its logits into one fixed tensor, as a graph's replays do.
    from rawqlora.decode import StaticDecoder, _run

    replays = []

    class Graph:
        def __init__(self, step):
            self.step = step
            step()

        def replay(self):
            replays.append(1)
            self.step()

    monkeypatch.setattr(cuda_graph, "capture", lambda step, stream, generator=None, pool=None: Graph(step))
    monkeypatch.setattr(decode, "PREFILL_GRAPHS", 2)
    decoder = StaticDecoder(llama, 1, Sampling(), [EOS], 0, 64)
    decoder.model = llama
    logits = torch.empty(1, llama.config.vocab_size)
    decoder.compiled_forward = lambda *inputs: logits.copy_(decoder._forward(*inputs))
    decoder.prefill_graphs, decoder.prefill_pool = {}, None
    prompts = encoded[:3]
    assert len({len(p) for p in prompts}) == 3
    with torch.inference_mode():
        for prompt in prompts:
            for tokens in (prompt, prompt[::-1]):  # the second: the same width, other tokens, replayed
                out = _run(decoder, [tokens], N, 0, None, graph=False, on_cuda=False)
                assert out.tokens == generate(llama, [tokens], N, [EOS], cache="static").tokens
    assert len(replays) == 3
    assert list(decoder.prefill_graphs) == [len(p) for p in prompts[1:]]  # the last two widths kept
