"""rawqlora/decode_attention.py: the grouped one-token attention computes what sdpa computes."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rawqlora import decode_attention
from rawqlora.decode import StaticDecoder, generate
from rawqlora.static_cache import visible_columns
from rawqlora.tiny import tiny_model


def test_one_token_attention_equals_sdpa_under_a_padding_mask():
    model = tiny_model("llama", 101, seed=0, layers=1, heads=8, kv_heads=2)  # 4 query heads a KV head
    attention = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    batch, columns, dim = 3, 11, attention.head_dim
    query = torch.randn(batch, 8, 1, dim, generator=g)
    key, value = (torch.randn(batch, 2, columns, dim, generator=g) for _ in range(2))
    real = torch.ones(batch, columns, dtype=torch.bool)
    real[1, :4] = False  # left padding
    real[2, :9] = False
    mask = visible_columns(real, torch.tensor([7]), torch.arange(columns))  # columns past 7 not written yet
    ours, _ = decode_attention.one_token_attention(attention, query, key, value, mask, scaling=attention.scaling)
    theirs, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=attention.scaling)
    assert ours.shape == theirs.shape == (batch, 1, 8, dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_other_calls_go_to_sdpa():
    model = tiny_model("llama", 101, seed=0, layers=1)
    attention = model.model.layers[0].self_attn
    query = torch.randn(2, 4, 5, attention.head_dim)  # five queries: a prefill
    key = value = torch.randn(2, 2, 5, attention.head_dim)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    ours, _ = decode_attention.one_token_attention(attention, query, key, value, mask, scaling=attention.scaling)
    theirs, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=attention.scaling)
    assert torch.equal(ours, theirs)


def test_model_decodes_the_same_tokens_through_it(monkeypatch):
    # The static cache's eager decode steps (its masks, its columns) with the model's attention
    # routed here, as a compiled CUDA step runs them, against the same decode through sdpa.
    model = tiny_model("mistral", 101, seed=0, layers=2).eval()
    prompts = [[5, 9, 14, 3, 77, 21], [8, 40, 2]]
    expected = generate(model, prompts, 12, cache="static", graph=False).tokens
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])  # query length
        return decode_attention.one_token_attention(*args, **kwargs)

    plain_step = StaticDecoder.eager_step
    monkeypatch.setattr(StaticDecoder, "eager_step", lambda self: decode_attention.routed(self, lambda: plain_step(self))())
    AttentionInterface.register(decode_attention.NAME, counted)
    try:
        assert generate(model, prompts, 12, cache="static", graph=False).tokens == expected
    finally:
        AttentionInterface.register(decode_attention.NAME, decode_attention.one_token_attention)
    assert calls == [1] * (11 * 2)  # 11 decode steps after the first token, 2 layers; the prefill stays sdpa
    assert model.config._attn_implementation == "sdpa"  # put back


def test_routed_puts_the_setting_back_after_an_error():
    model = tiny_model("llama", 101, seed=0, layers=1)
    seen = []

    def step():
        seen.append(model.config._attn_implementation)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        decode_attention.routed(SimpleNamespace(model=model), step)()
    assert seen == [decode_attention.NAME] and model.config._attn_implementation == "sdpa"


def test_arguments_it_does_not_handle_go_to_sdpa(monkeypatch):
    model = tiny_model("llama", 101, seed=0, layers=1)
    attention = model.model.layers[0].self_attn
    query, key = torch.randn(1, 4, 1, attention.head_dim), torch.randn(1, 2, 6, attention.head_dim)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    calls = []
    monkeypatch.setattr(decode_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or (None, None))
    decode_attention.one_token_attention(attention, query, key, key, mask, scaling=1.0, softcap=30.0)
    assert calls and calls[0]["softcap"] == 30.0


@pytest.mark.parametrize("heads, kv_heads, dim, columns, programs", [
    (8, 2, 64, 150, 264),  # Mistral's grouping (4 query heads a KV head); 5 parts of a block, the last partial
    (8, 2, 64, 150, 12),  # 2 parts of 3 blocks: the last block of the last part past the columns
    (8, 2, 64, 30, 264),  # one block: no split
    (7, 7, 32, 64, 264),  # no grouping, an odd head count: padded rows
    (28, 4, 128, 40, 264),  # Qwen2-7B's 7 query heads a KV head, 128-wide heads, one partial block
])
def test_kernel_equals_grouped_attention(heads, kv_heads, dim, columns, programs, monkeypatch):
    # rawqlora/decode_attention_kernel.py against the reference math, on the GPU or in Triton's interpreter
    from rawqlora import decode_attention_kernel

    monkeypatch.setattr(decode_attention_kernel, "PROGRAMS", programs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(heads + columns)
    batch = 3
    query = torch.randn(batch, heads, 1, dim, generator=g).to(device, torch.bfloat16)
    cache = torch.randn(2, batch, kv_heads, columns + 16, dim, generator=g).to(device, torch.bfloat16)
    key, value = cache[0, :, :, :columns], cache[1, :, :, :columns]  # views of a longer cache, as decode's
    real = torch.ones(batch, columns, dtype=torch.bool)
    real[1, :70] = False  # left padding past whole blocks (for the 30-column case: row 1 sees only its own)
    real[2, :5] = False
    visible = visible_columns(real, torch.tensor([columns - 9]), torch.arange(columns)).to(device)
    ours = decode_attention_kernel._launch(query, key, value, visible, dim**-0.5)
    ref = decode_attention.grouped_attention(query, key, value, visible, dim**-0.5)
    assert ours.shape == ref.shape == (batch, 1, heads, dim) and ours.dtype == torch.bfloat16
    # the parts merge in a fixed order, and the last one resets its counter for the next call
    assert torch.equal(decode_attention_kernel._launch(query, key, value, visible, dim**-0.5), ours)
    # the kernel rounds p to bf16 for p·v (2^-9 of each weight, so at most 2^-9 of max |v|), then
    # both round the output to bf16 (2^-9 of it)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2**-8, atol=2**-8 * value.abs().max().item())


def test_kernel_takes_any_layout():
    # the kernel steps through d with stride 1: another layout (here d strided) is copied first
    from rawqlora import decode_attention_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, 4, 1, 32, generator=g).to(device, torch.bfloat16)
    key, value = (torch.randn(1, 2, 32, 20, generator=g).to(device, torch.bfloat16).transpose(2, 3) for _ in range(2))
    assert key.stride(-1) != 1
    visible = torch.ones(1, 1, 1, 20, dtype=torch.bool, device=device)
    ours = decode_attention_kernel._launch(query, key, value, visible, 0.2)
    assert torch.equal(ours, decode_attention_kernel._launch(query, key.contiguous(), value.contiguous(), visible, 0.2))


def test_kernel_takes_16_bit_inputs_and_its_shapes_only():
    from rawqlora import decode_attention_kernel
    from fast.triton_support import triton

    def fits(dtype=torch.bfloat16, heads=8, kv_heads=2, dim=64):
        return decode_attention_kernel.fits(torch.empty(1, heads, 1, dim, dtype=dtype),
                                            torch.empty(1, kv_heads, 5, dim, dtype=dtype))

    assert fits() == fits(torch.float16) == (triton is not None)
    assert not fits(torch.float32)  # TF32 products: the reference's fp32 math instead
    assert not fits(dim=96) and not fits(dim=512) and not fits(heads=130, kv_heads=2)


@pytest.mark.parametrize("heads, kv_heads, dim, columns, column, programs", [
    (8, 2, 64, 150, 140, 264),  # the column in the last of 5 parts
    (8, 2, 64, 150, 37, 12),  # in the first of 2 parts: the other part reads the column unwritten
    (28, 4, 128, 40, 39, 264),  # Qwen2-7B's grouping, one partial block
])
def test_rotary_kernel_equals_the_layer_code_it_replaces(heads, kv_heads, dim, columns, column, programs, monkeypatch):
    # rotary_attention against what the layer does: transformers' apply_rotary_pos_emb, the cache's
    # index_copy_, the attention (on the GPU or in Triton's interpreter)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from rawqlora import decode_attention_kernel

    monkeypatch.setattr(decode_attention_kernel, "PROGRAMS", programs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(heads + column)
    batch = 3

    def bf16(*shape):
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    projected = bf16(batch, 1, (heads + 2 * kv_heads) * dim)  # q, k, v as slices of one product, as decode's
    query, key, value = projected.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    query, key, value = (t.view(batch, 1, -1, dim) for t in (query, key, value))
    angles = torch.rand(batch, 1, dim // 2, generator=g) * 100
    cos, sin = (f(torch.cat([angles, angles], dim=-1)).to(device, torch.bfloat16) for f in (torch.cos, torch.sin))
    caches = bf16(2, batch, kv_heads, columns, dim)
    real = torch.ones(batch, columns, dtype=torch.bool)
    real[1, :70] = False
    at = torch.tensor([column])
    visible = visible_columns(real, at, torch.arange(columns)).to(device)

    key_cache, value_cache = caches.clone()
    ours = decode_attention_kernel.rotary_attention(query, key, value, cos, sin, key_cache, value_cache, at.to(device),
                                                    visible, dim**-0.5)
    q, k = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    ref_keys, ref_values = caches.clone()
    ref_keys.index_copy_(2, at.to(device), k)
    ref_values.index_copy_(2, at.to(device), value.transpose(1, 2))
    assert torch.equal(key_cache, ref_keys) and torch.equal(value_cache, ref_values)  # eager bf16's rounding
    # the attention: the plain kernel's on the layer's rotated query, bit for bit, and so the reference's
    assert torch.equal(ours, decode_attention_kernel._launch(q, ref_keys, ref_values, visible, dim**-0.5))
    ref = decode_attention.grouped_attention(q, ref_keys, ref_values, visible, dim**-0.5)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2**-8, atol=2**-8 * value.abs().max().item())


@pytest.mark.parametrize("nf4", [False, True])
def test_layers_decode_through_the_rotary_kernel(make_model_dir, nf4, monkeypatch):
    # A bf16 model's routed decode steps with layer_forward against the same steps with only the
    # attention function routed (the plain kernel after the layer's own rotary and cache write): the
    # rotary kernel computes the same bits, so the same tokens; the prefill keeps the layer's forward.
    # nf4: an NF4 base with an unmerged LoRA adapter on every projection (bf16 compute).
    import lora
    import quant
    from rawqlora import decode_attention_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(decode_attention, "KERNEL_DEVICES", (device,))  # on the CPU: in Triton's interpreter
    prompts = [[5, 9, 14, 3, 77, 21], [8, 40, 2]]
    plain_step = StaticDecoder.eager_step

    def decode(route_layers):
        model = quant.load_model(make_model_dir("llama"), quant="nf4" if nf4 else None, device=device).eval()
        if nf4:
            torch.manual_seed(0)  # the same adapter (A's initialisation too) in both decodes
            lora.inject(model, "all-linear", r=4, alpha=8)
            for layer in lora.lora_modules(model).values():
                torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # B away from zero: the adapter matters
        monkeypatch.setattr(decode_attention, "route_layers", route_layers)
        monkeypatch.setattr(StaticDecoder, "eager_step",
                            lambda self: decode_attention.routed(self, lambda: plain_step(self))())
        return generate(model, prompts, 10, cache="static", graph=False).tokens

    calls = []
    rotary, route_layers = decode_attention_kernel.rotary_attention, decode_attention.route_layers
    monkeypatch.setattr(decode_attention_kernel, "rotary_attention", lambda *a: calls.append(1) or rotary(*a))
    expected = decode(lambda model: None)
    assert not calls
    assert decode(route_layers) == expected
    assert len(calls) == 9 * 2  # 9 decode steps after the first token, 2 layers


@pytest.mark.parametrize("rotary", [True, False])
def test_compiled_step_decodes_as_the_eager_one(rotary, monkeypatch):
    # torch.compile (Inductor) calls rotary_attention as the custom op rawqlora::rotary_one_token_attention,
    # which writes the caches it is given, and `attention` as rawqlora::one_token_attention (rotary=False:
    # the layers' own forward): the compiled routed step picks the eager routed step's tokens (on the CPU:
    # C++ code around the kernel in Triton's interpreter).
    from rawqlora import decode_attention_kernel
    from rawqlora.decode import COMPILE_OPTIONS, Sampling, left_pad

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(decode_attention, "KERNEL_DEVICES", (device,))  # on the CPU: in Triton's interpreter
    launches = []
    launch = decode_attention_kernel._launch
    monkeypatch.setattr(decode_attention_kernel, "_launch",
                        lambda *a, new=None: launches.append(new is not None) or launch(*a, new=new))
    if not rotary:
        monkeypatch.setattr(decode_attention, "route_layers", lambda model: None)
    model = tiny_model("llama", 101, seed=0, layers=2, dtype=torch.bfloat16).eval().to(device)
    ids, mask = left_pad([[5, 9, 14, 3], [7, 8]], 0, device)

    def tokens(compiled):
        decoder = StaticDecoder(model, 2, Sampling(), [], 0, 32)
        step = decoder.eager_step
        if compiled:
            step = torch.compile(step, dynamic=False, options=COMPILE_OPTIONS)
        step = decode_attention.routed(decoder, step)
        with torch.inference_mode():
            decoder.prefill(ids, mask)
            out = [decoder.report[0].tolist()]
            for _ in range(8):
                step()
                out.append(decoder.report[0].tolist())
        return out

    assert tokens(compiled=True) == tokens(compiled=False)
    assert launches == [rotary] * (2 * 8 * 2)  # both runs: 8 steps of 2 layers, each the rotary kernel or not
