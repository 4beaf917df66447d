import pytest
import torch

import lora
import fast.lora_function
from fast import fused
from training import grad_ckpt
from training.loss import causal_lm_loss
from rawqlora.tiny import tiny_config, tiny_model


def lora_grads(offload, checkpointing, dropout, mlp_chunk=0, fused_kernels=False, fused_dropout=False,
               device="cpu"):
    model = tiny_model("llama", 101, seed=0).to(device)
    lora.inject(model, "all-linear", r=4, alpha=8, dropout=dropout)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)  # B = 0 would zero every A-gradient
    if fused_kernels:
        fused.enable(model, compile=False)
    for m in lora.lora_modules(model).values():
        m.fused_dropout = fused_dropout  # lora/kernels.py's path (tests/test_lora_kernels.py)
    if checkpointing:
        grad_ckpt.enable(model.get_decoder().layers, offload=offload, mlp_chunk=mlp_chunk)
    elif mlp_chunk:
        for layer in model.get_decoder().layers:
            grad_ckpt.chunk_mlp(layer.mlp, mlp_chunk)
    model.train()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(7)  # the same dropout masks for every variant
    total, n = causal_lm_loss(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state, model.lm_head, ids)
    (total / n).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("offload", [False, True])
def test_checkpointed_gradients_equal_plain_backward(offload, dropout):
    # Recomputation repeats the same fp32 operations with the same random state, so the
    # gradients (layer 0's included: its input needs no grad) match the un-checkpointed
    # run to within reordering of the accumulation (1e-6 relative).
    plain = lora_grads(offload=False, checkpointing=False, dropout=dropout)
    ckpt = lora_grads(offload=offload, checkpointing=True, dropout=dropout)
    assert plain.keys() == ckpt.keys() and any("layers.0." in k for k in ckpt)
    for k in plain:
        assert ckpt[k] is not None, k
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("offload", [False, True])
def test_chunked_mlp_gradients(offload):
    # 26 tokens in chunks of 5: six chunks, the last one short. Without dropout the MLP is
    # the same function chunked or not, so the gradients match the plain backward's, up to
    # the order of summation: an MLP weight's gradient is now a sum of six per-chunk
    # products (fp32 reassociation, ~1e-8 absolute on gradients of ~1e-3).
    plain = lora_grads(offload=False, checkpointing=False, dropout=0.0)
    chunked = lora_grads(offload=offload, checkpointing=True, dropout=0.0, mlp_chunk=5)
    for k in plain:
        torch.testing.assert_close(chunked[k], plain[k], rtol=1e-5, atol=1e-7)
    # With dropout each chunk draws its own mask, so compare with chunking alone: the layer
    # recompute and the chunk recompute must both replay exactly the masks of the forward.
    alone = lora_grads(offload=False, checkpointing=False, dropout=0.1, mlp_chunk=5)
    both = lora_grads(offload=offload, checkpointing=True, dropout=0.1, mlp_chunk=5)
    for k in alone:
        torch.testing.assert_close(both[k], alone[k], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mlp_chunk", [0, 5])
@pytest.mark.parametrize("offload", [False, True])
def test_recompute_skips_the_mlp_output_projection(offload, mlp_chunk, monkeypatch):
    # With the fused MLP, a recompute runs down_proj for its saved tensors only: its base
    # weight is used twice per layer (forward, backward), not three times, and the
    # gradients are unchanged, dropout included.
    uses = []
    real = fast.lora_function.dense_weight
    monkeypatch.setattr(fast.lora_function, "dense_weight", lambda base, dtype: uses.append(base) or real(base, dtype))
    plain = lora_grads(offload=False, checkpointing=False, dropout=0.1, mlp_chunk=mlp_chunk)
    uses.clear()
    ckpt = lora_grads(offload=offload, checkpointing=True, dropout=0.1, mlp_chunk=mlp_chunk, fused_kernels=True)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)
    config = tiny_config("llama", 101)
    down = [b for b in uses if b.in_features == config.intermediate_size]
    chunks = 1 if mlp_chunk == 0 else 6  # 26 tokens in chunks of 5
    assert len(down) == 2 * config.num_hidden_layers * chunks


def test_offload_two_forwards_then_one_backward():
    # Each forward parks its own copies, so a loss over two passes (as in preference
    # training: chosen and rejected) backpropagates each pass through its own inputs.
    def grads(offload):
        model = tiny_model("llama", 101, seed=0)
        lora.inject(model, "all-linear", r=4, alpha=8)
        for m in lora.lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
        grad_ckpt.enable(model.get_decoder().layers, offload=offload)
        model.train()
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(2):
            ids = torch.randint(0, 101, (2, 9), generator=g)
            total, n = causal_lm_loss(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state,
                                      model.lm_head, ids)
            losses.append(total / n)
        (losses[0] + 2 * losses[1]).backward()
        return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    on_gpu, parked = grads(False), grads(True)
    for k in on_gpu:
        torch.testing.assert_close(parked[k], on_gpu[k], rtol=1e-6, atol=1e-8)
