"""Attention capture on tiny SD-shaped UNets: restoration, faithfulness, and the aggregation math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_conceptexpress.attention import AttentionRecorder, capture_attention, layer_grid


def unet_inputs(unet, latent=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, *latent, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10]), ctx


class NaiveRecorder:
    """Reference: stores every self-attention layer's full head-averaged probabilities."""

    def __init__(self):
        self.maps = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(hidden_states))
        p = attn.get_attention_scores(q, k)
        self.maps.append(p.reshape(-1, attn.heads, *p.shape[1:]).mean(1)[0])
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(p, v))))
        return out / attn.rescale_output_factor


def naive_aggregate(maps, size, weighting="reference"):
    h, w = size
    total = torch.zeros(h * w, h * w)
    for p in maps:
        _, gh, gw = layer_grid(size, p.shape[0])
        up = F.interpolate(p.reshape(-1, 1, gh, gw), size=(h, w), mode="bilinear", align_corners=False)
        up = up.reshape(gh, gw, h * w)
        up = up.repeat_interleave(h // gh, 0).repeat_interleave(w // gw, 1).reshape(h * w, h * w)
        weight = {"reference": gh / h, "uniform": gh * gw / (h * w), "resolution": gh / h * gh * gw / (h * w)}
        total += weight[weighting] * up
    return total / total.sum(1, keepdim=True)


def test_layer_grid_non_square_and_odd():
    assert layer_grid((64, 64), 4096) == (1, 64, 64)
    assert layer_grid((64, 64), 256) == (4, 16, 16)
    assert layer_grid((16, 24), 4 * 6) == (4, 4, 6)
    assert layer_grid((13, 7), 7 * 4) == (2, 7, 4)
    with pytest.raises(ValueError, match="matches no downsampling"):
        layer_grid((16, 16), 100)


def test_processors_restored_and_output_unchanged(kind, components_factory):
    unet = components_factory(kind)["unet"]
    x, t, ctx = unet_inputs(unet)
    before_types = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        rec = AttentionRecorder((16, 16), cross_token_indices=[1, 5])
        with capture_attention(unet, rec):
            during = unet(x, t, encoder_hidden_states=ctx).sample
        after = unet(x, t, encoder_hidden_states=ctx).sample
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before_types
    assert (after - ref).abs().max() < 1e-5
    assert (during - ref).abs().max() < 1e-4  # recording computes the same attention
    # restored even when the block raises
    with pytest.raises(RuntimeError, match="boom"), capture_attention(unet, AttentionRecorder((16, 16))):
        raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before_types


@pytest.mark.parametrize("weighting", ["reference", "uniform", "resolution"])
def test_chunked_running_sum_equals_naive_aggregation(components_factory, weighting):
    unet = components_factory("sd2-v")["unet"]
    x, t, ctx = unet_inputs(unet)
    naive = NaiveRecorder()
    procs = dict(unet.attn_processors)
    unet.set_attn_processor({k: naive if "attn1" in k else v for k, v in procs.items()})
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)
    unet.set_attn_processor(dict(procs))
    expected = naive_aggregate(naive.maps, (16, 16), weighting)
    # a tiny chunk budget forces many query chunks and scatter blocks
    rec = AttentionRecorder((16, 16), self_weighting=weighting, chunk_bytes=20_000)
    with torch.no_grad(), capture_attention(unet, rec):
        unet(x, t, encoder_hidden_states=ctx)
    got = rec.self_attention()[0]
    assert got.shape == (256, 256)
    torch.testing.assert_close(got.sum(1), torch.ones(256))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    assert len(rec.self_layers) == len(naive.maps) == 7  # 2 down, 1 mid, 4 up transformer blocks


def test_reference_weighting_lets_low_resolutions_dominate():
    # One row of a 2x2 layer and one of a 4x4 layer, both uniform; the 2x2 layer is upsampled x2.
    rec = AttentionRecorder((4, 4))
    rec.add_self_attention(torch.zeros(1, 16, 16).index_fill_(2, torch.tensor([0]), 1.0), 0, (4, 4))
    rec.add_self_attention(torch.zeros(1, 4, 4).index_fill_(2, torch.tensor([3]), 1.0), 0, (2, 2))
    row = rec._self_sum[0, 0]
    # 4x4 layer: mass 1 x weight 1; 2x2 layer: mass 4 (bilinear x2 upsampling) x weight 1/2 = 2
    assert row.sum().item() == pytest.approx(3.0, rel=1e-5)
    assert row[0].item() == pytest.approx(1.0, abs=1e-6)  # the 2x2 layer's mass sits at the far corner
    assert row[1:].sum().item() == pytest.approx(2.0, rel=1e-5)  # the low-resolution layer counts double


def test_non_square_latent_capture(components_factory):
    unet = components_factory("sd1")["unet"]
    x, t, ctx = unet_inputs(unet, latent=(16, 24))
    rec = AttentionRecorder((16, 24), cross_token_indices=[1])
    with torch.no_grad(), capture_attention(unet, rec):
        unet(x, t, encoder_hidden_states=ctx)
    assert rec.self_attention().shape == (1, 384, 384)
    assert rec.cross_attention_factors() == [1, 2]
    assert rec.cross_attention(2).shape == (1, 1, 8, 12)
    assert torch.isfinite(rec.cross_attention(1)).all()


def test_cross_attention_with_gradient(components_factory):
    unet = components_factory("sd2")["unet"]
    x, t, ctx = unet_inputs(unet)
    ctx.requires_grad_(True)
    rec = AttentionRecorder(
        (16, 16), record_self=False, cross_token_indices=[2, 3], cross_factors=[2], cross_with_grad=True
    )
    with capture_attention(unet, rec):
        unet(x, t, encoder_hidden_states=ctx)
    maps = rec.cross_attention(2)
    assert maps.shape == (1, 2, 8, 8) and maps.requires_grad
    assert set(rec.cross_attention_factors()) == {2}
    maps[:, 0].sum().backward()
    assert ctx.grad[0, 2].abs().sum() > 0  # the recorded token's embedding gets a gradient
    with pytest.raises(RuntimeError, match="No self-attention"):
        rec.self_attention()
