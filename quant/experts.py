"""Mixtral's experts as plain `nn.Linear` modules, so bitsandbytes and LoRA can reach them.

transformers 5 fuses the experts of each MoE layer into two 3-D parameters and converts
the checkpoint while loading. Every Mixtral checkpoint on disk (transformers 5's own
`save_pretrained` included) keeps one Linear per projection:

    on disk                                          transformers 5 module
    layers.L.block_sparse_moe.gate.weight        ->  layers.L.mlp.gate.weight             router
    layers.L.block_sparse_moe.experts.E.w1.weight ->  layers.L.mlp.experts.gate_up_proj[E, :I]  gate
    layers.L.block_sparse_moe.experts.E.w3.weight ->  layers.L.mlp.experts.gate_up_proj[E, I:]  up
    layers.L.block_sparse_moe.experts.E.w2.weight ->  layers.L.mlp.experts.down_proj[E]        down

A 3-D parameter is not an `nn.Linear`: bitsandbytes cannot quantize it and LoRA cannot
wrap it. So `unfuse_experts` swaps each fused `MixtralExperts` for `LinearExperts`, which
keeps the on-disk layout (`layers.L.mlp.experts.E.w1/w2/w3`); the only renaming left is
`.block_sparse_moe.` <-> `.mlp.`, done by `module_key` / `checkpoint_key`, the one place
that knows it in both directions.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

# model_type -> (name fragment on disk, name fragment in our modules)
RENAMES = {"mixtral": (".block_sparse_moe.", ".mlp.")}


def module_key(model_type, key):
    """Checkpoint tensor name -> name in the model `load_model` builds."""
    disk, ours = RENAMES.get(model_type, ("", ""))
    return key.replace(disk, ours) if disk else key


def checkpoint_key(model_type, key):
    """Name in our model -> checkpoint tensor name (what `save_quantized` writes)."""
    disk, ours = RENAMES.get(model_type, ("", ""))
    return key.replace(ours, disk) if disk else key


class Expert(nn.Module):
    """One SwiGLU expert: w2(act(w1 x) * w3 x), named as in the checkpoint."""

    def __init__(self, hidden_size, intermediate_size, act_fn):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)  # down
        self.act_fn = act_fn

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class LinearExperts(nn.ModuleList):
    """Drop-in for transformers' `MixtralExperts`: same forward, one `Expert` per index."""

    def __init__(self, config):
        act_fn = ACT2FN[config.hidden_act]
        super().__init__(
            Expert(config.hidden_size, config.intermediate_size, act_fn)
            for _ in range(config.num_local_experts)
        )

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """hidden_states [T, H]; top_k_index, top_k_weights [T, k] from the router -> [T, H]."""
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:  # no token routed here: skip the matmuls entirely
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            # The router weights are fp32, so y may be too; accumulate in the model's dtype
            # as transformers does.
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_experts(model):
    """Replace every fused `MixtralExperts` in `model` by a `LinearExperts` (on the current device)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MixtralExperts):
            model.set_submodule(name, LinearExperts(model.config))
