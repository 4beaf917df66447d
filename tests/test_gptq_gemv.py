"""quant/gptq_gemv.py, the batch-1 GPTQ product, against float64 products of the checkpoint's own Ŵ.

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py): the same programs (the
GEMV's split-K partial sums, its counter protocol and reset), one program at a time. With one, on it.
"""

import pytest
import torch
import torch.nn.functional as F

from quant import gptq
from quant.gptq_checkpoint import GPTQLinear
from quant import split_k
from quant.gptq_gemv import GemvTile, gptq_gemv, tile_for
from quant.gptq_matmul import config, gptq_matmul, workspace_need


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantized_layer(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = gptq.rtn_quantize(torch.randn(n, k, generator=g) * 0.02, group_size=group)
    return GPTQLinear.from_quantized(q).to(DEVICE)


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def checkpoint_zeros(layer):
    return layer.zero_points().to(torch.uint8)


@pytest.mark.parametrize("pairs", [True, False])  # x read in int32 pairs, or one bf16 at a time
@pytest.mark.parametrize("tile, k, group", [
    (GemvTile(256, 128, 1, 2, True), 512, 128),  # the library's tile: 4 partial sums per column block
    (GemvTile(256, 32, 4, 1, True), 1024, 128),  # several steps a program, 8 partials
    (GemvTile(256, 64, 1, 2, True), 512, 64),  # a group per step
    (GemvTile(256, 32, 2, 1, True), 256, 32),  # several groups a program
    (GemvTile(256, 128, 2, 2, True), 256, 128),  # one program along K: no partials, y written directly
])
def test_kernel_equals_float64_product(tile, k, group, pairs):
    tile = tile._replace(pairs=pairs)
    n = 512
    layer = quantized_layer(n, k, group, seed=k + group)
    zeros = checkpoint_zeros(layer)
    x = randn(1, k, seed=1, dtype=torch.bfloat16)
    ref = x.double() @ layer.dequantize().double().T
    ws = split_k.workspace(DEVICE, *tile.workspace_need(n, k))
    y = gptq_gemv(x, layer.qweight, layer.scales, zeros, group, tile, ws, out_dtype=torch.float32)
    # fp32 y from the same bf16 inputs: only the kernel's own fp32 sums differ from float64 (taking
    # out the 1 and 16 of the codes' floats cancels by at most 256x: ~2^-16 of the scale, measured ~2e-6)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-5
    assert torch.count_nonzero(ws.counters) == 0  # ready for the next call
    again = gptq_gemv(x, layer.qweight, layer.scales, zeros, group, tile, ws, out_dtype=torch.float32)
    assert torch.equal(again, y)  # same order, same bits


def test_gptq_linear_sends_one_row_to_the_kernel():
    n, k = 512, 256
    layer = quantized_layer(n, k, 128, seed=3)
    assert layer.own_kernels_fit()
    layer.prepare_own()
    assert layer.own[0] == tile_for(n, k, 128)
    x = randn(1, 1, k, seed=2, dtype=torch.bfloat16)
    tile, zeros, ws = layer.own
    y = layer(x)
    assert y.shape == (1, 1, n) and y.dtype == torch.bfloat16
    assert torch.equal(y.reshape(1, n), gptq_gemv(x.reshape(1, k), layer.qweight, layer.scales, zeros, 128, tile, ws))
    ref = F.linear(x.double(), layer.dequantize().double())
    # bf16 y: one rounding of a float32 sum (the interpreter's float -> bf16 cast truncates: < 2^-7 relative)
    torch.testing.assert_close(y.double(), ref, rtol=2**-7, atol=1e-3 * ref.abs().max().item())
    rows = randn(3, k, seed=3, dtype=torch.bfloat16)  # more than one row: quant/gptq_matmul.py's
    assert torch.equal(layer(rows), gptq_matmul(rows, layer.qweight, layer.scales, zeros, 128, ws))


def test_gemv_takes_a_view_starting_mid_word():
    # x read as int32 pairs: a bf16 view at an odd element offset is copied first, same result
    n, k = 256, 256
    layer = quantized_layer(n, k, 128, seed=4)
    layer.prepare_own()
    _, zeros, ws = layer.own
    tile = GemvTile(256, 128, 1, 2, pairs=True)
    x = randn(1, k + 1, seed=5, dtype=torch.bfloat16).reshape(-1)[1:].reshape(1, k)
    assert x.storage_offset() == 1 and x.is_contiguous()
    y = gptq_gemv(x, layer.qweight, layer.scales, zeros, 128, tile, ws)
    assert torch.equal(y, gptq_gemv(x.clone(), layer.qweight, layer.scales, zeros, 128, tile, ws))


def test_tile_only_where_it_fits():
    assert tile_for(4096, 4096, 128) == GemvTile(256, 128, 1, 2, pairs=False)  # 512 programs
    assert tile_for(28672, 4096, 128).pairs  # 3,584 programs: bound by issue, x in pairs
    assert tile_for(4096, 4096, 64).block_k == 64  # a step never straddles a group
    assert tile_for(4000, 4096, 128) is None  # outputs not a multiple of the block: tinygemm
    assert tile_for(4096, 4160, 128) is None


@pytest.mark.parametrize("m, k, group, split", [
    (2, 2048, 128, 4),  # x reordered by nibble; a tile of 16 rows, masked; K in 4 parts
    (17, 1024, 128, 2),  # reordered; 32 rows, masked; 2 parts
    (40, 2048, 256, 4),  # x in input order; 64 rows, masked; 4 parts
    (40, 512, 256, 1),  # in order; K too short to split, y written directly
    (70, 256, 128, 1),  # in order; two tiles of 64 rows, the second masked; no split above 64 rows
])
def test_matmul_equals_float64_product(m, k, group, split):
    n = 192
    assert config(m, n, k)[1] == split
    layer = quantized_layer(n, k, group, seed=m)
    x = randn(m, k, seed=m, dtype=torch.bfloat16)
    ws = split_k.workspace(DEVICE, *workspace_need(n, k))
    y = gptq_matmul(x, layer.qweight, layer.scales, checkpoint_zeros(layer), group, ws)
    ref = x.double() @ layer.dequantize().double().T
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    # bf16 y: one rounding of an fp32 sum, under one ulp (2^-7 of |y| at most; on a GPU to nearest,
    # half that; the interpreter's cast truncates)
    err = (y.double() - ref).abs() - 2**-7 * ref.abs()
    assert err.max().item() < 1e-5 * ref.abs().max().item()
    assert torch.count_nonzero(ws.counters) == 0
    assert torch.equal(gptq_matmul(x, layer.qweight, layer.scales, checkpoint_zeros(layer), group, ws), y)


def test_shared_workspace_only_grows():
    current = split_k.workspace("cpu", 1, 1)  # other tests may have made it already: start from its size
    room, counters = current.partials.numel(), current.counters.numel()
    assert split_k.workspace("cpu", room, counters) is current  # room enough: the same buffers
    big = split_k.workspace("cpu", room + 10, 1)
    assert big is not current  # new buffers; a layer holding the old ones keeps them
    assert big.partials.numel() >= room + 10 and big.counters.numel() >= counters
    assert torch.count_nonzero(big.counters) == 0
    assert split_k.workspace("cpu", 1, 1) is big  # never shrinks back


def test_custom_ops_equal_the_eager_launches():
    # torch.compile calls the kernels through rawqlora::gptq_gemv / gptq_matmul; eager calls launch them directly
    n, k = 256, 512
    layer = quantized_layer(n, k, 128, seed=9)
    layer.prepare_own()
    tile, zeros, ws = layer.own
    one, rows = randn(1, k, seed=1, dtype=torch.bfloat16), randn(5, k, seed=2, dtype=torch.bfloat16)
    assert torch.equal(torch.ops.rawqlora.gptq_gemv(one, layer.qweight, layer.scales, zeros, ws.partials,
                                                    ws.counters, 128, list(tile), False), layer(one))
    assert torch.equal(torch.ops.rawqlora.gptq_matmul(rows, layer.qweight, layer.scales, zeros, ws.partials,
                                                      ws.counters, 128), layer(rows))
