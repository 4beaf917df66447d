import pytest
import torch

import lora
from rawqlora import grad_ckpt
from rawqlora.loss import causal_lm_loss
from rawqlora.tiny import tiny_model


def lora_grads(offload, checkpointing, dropout):
    model = tiny_model("llama", 101, seed=0)
    lora.inject(model, "all-linear", r=4, alpha=8, dropout=dropout)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)  # B = 0 would zero every A-gradient
    if checkpointing:
        grad_ckpt.enable(model.get_decoder().layers, offload=offload)
    model.train()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))
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
