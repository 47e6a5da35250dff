"""The U-Net: shapes, dependence on t and label, and the input-size check."""
import pytest
import torch

from diffusion.config import ModelConfig
from diffusion.model import Attention, UNet, build_model, output_coefficients, timestep_embedding


def perturbed(model: UNet) -> UNet:
    """Move parameters off their zero init so every input can reach the output."""
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 16)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert torch.allclose(emb[:, :8] ** 2 + emb[:, 8:] ** 2, torch.ones(3, 8), atol=1e-6)


@pytest.mark.parametrize("channels,size,mults", [(1, 28, (1, 4, 4)), (3, 32, (1, 2, 2, 2)), (1, 28, (1, 2))])
def test_output_shape_equals_input_shape(channels, size, mults):
    model = UNet(channels=channels, image_size=size, base_channels=8, channel_mults=mults,
                 attention_resolutions=(size // 2,))
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_default_model_is_small():
    n = sum(p.numel() for p in build_model(ModelConfig()).parameters())
    assert 0.25e6 < n < 0.35e6  # 32/32 channels: 291,748 parameters


@pytest.mark.parametrize("resolutions,level_skips,stem_skip,layers", [
    ((), True, True, 1), ((7,), True, False, 4), ((14, 7), True, True, 7), ((14, 7), True, False, 6),
    ((7,), False, True, 3), ((14, 7), False, False, 5), ((14, 7), False, True, 6)])
def test_attention_sits_in_the_levels_asked_for_and_always_in_the_middle(resolutions, level_skips, stem_skip, layers):
    """On 2x2 patches the levels run at 14 and 7: one block down per level, and up one more at 7 with the level
    skips and one more at 14 with the stem's; and the middle block."""
    model = UNet(base_channels=8, channel_mults=(1, 1), patch_size=2, attention_resolutions=resolutions,
                 level_skips=level_skips, stem_skip=stem_skip)
    assert sum(isinstance(m, Attention) for m in model.modules()) == layers


@pytest.mark.parametrize("level_skips,stem_skip,up_inputs", [(True, True, [[16, 16], [16, 16]]),
                                                             (True, False, [[16, 16], [16]]),
                                                             (False, True, [[16], [16, 16]]),
                                                             (False, False, [[16], [16]])])
def test_the_up_path_takes_the_skips_it_is_built_for(level_skips, stem_skip, up_inputs):
    """Every up block takes the skip of its mirror image on the way down, concatenated: with the level skips also the
    downsampling's output, with the stem skip the stem's, each with one block more at its level (Ho et al.)."""
    model = UNet(base_channels=8, channel_mults=(1, 1), patch_size=2, level_skips=level_skips, stem_skip=stem_skip)
    assert [[b.conv1[0].num_channels for b in level.blocks] for level in model.up] == up_inputs
    x = torch.randn(2, 1, 28, 28)
    assert perturbed(model)(x, torch.tensor([3, 700])).shape == x.shape


def test_the_stem_skip_carries_the_stem_across():
    """With the stem skip, the last up block also reads the stem's output: with the down path's first block cut
    (it outputs zeros), the image still reaches the output through that skip, and only through it."""
    for stem_skip in (True, False):
        model = perturbed(UNet(base_channels=8, channel_mults=(1, 1), patch_size=2, stem_skip=stem_skip))
        model.down[0].blocks[0].forward = lambda h, emb: torch.zeros_like(h)
        x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
        moved = (model(x, t) - model(x + torch.randn_like(x), t)).abs().max()
        assert (moved > 1e-3) == stem_skip, moved


@torch.no_grad()
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_is_softmax_of_scaled_dot_products_per_head(heads):
    """Vaswani et al.'s attention written out by hand: each head sees its own slice of C / heads channels, weighs
    every position by softmax(q . k / sqrt(C / heads)), and the heads' outputs are joined and projected."""
    layer = Attention(8, heads)
    torch.manual_seed(0)
    for p in layer.parameters():
        p.data.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 8, 3, 5)
    q, k, v = layer.qkv(layer.norm(x)).flatten(2).chunk(3, dim=1)  # (B, C, positions) each
    d = 8 // heads
    heads_out = []
    for h in range(heads):
        qh, kh, vh = (a[:, h * d:(h + 1) * d] for a in (q, k, v))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", qh, kh) / d**0.5, dim=-1)
        heads_out.append(torch.einsum("bij,bcj->bci", weights, vh))
    expected = x + layer.out(torch.cat(heads_out, dim=1).reshape(2, 8, 3, 5))
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_every_attention_layer_gets_the_heads_asked_for():
    model = build_model(ModelConfig(attention_heads=2))
    assert {m.heads for m in model.modules() if isinstance(m, Attention)} == {2}


@torch.no_grad()
def test_output_depends_on_t_and_label():
    model = perturbed(UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,)))
    x = torch.randn(2, 1, 28, 28)
    a, b = model(x, torch.tensor([10, 10])), model(x, torch.tensor([900, 900]))
    assert not torch.allclose(a, b, atol=1e-4)
    c, d = model(x, torch.tensor([10, 10]), torch.tensor([1, 1])), model(x, torch.tensor([10, 10]), torch.tensor([7, 7]))
    assert not torch.allclose(c, d, atol=1e-4)
    assert torch.allclose(a, model(x, torch.tensor([10, 10]), torch.tensor([10, 10])))  # None means "no label"


def test_input_size_must_divide_by_downsampling_factor():
    with pytest.raises(AssertionError):
        UNet(image_size=30, channel_mults=(1, 2, 2))
    with pytest.raises(AssertionError):
        UNet(base_channels=8, channel_mults=(1, 2, 2))(torch.randn(1, 1, 30, 30), torch.tensor([0]))


@torch.no_grad()
def test_a_patched_network_is_the_plain_network_on_patches():
    """patch_size 2: the U-Net of 4 channels at 14x14 run on each 2x2 patch's pixels as channels (channel 2i + j holds
    pixel (i, j) of its patch), the output put back pixel by pixel the same way."""
    patched = perturbed(UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(7,), patch_size=2))
    plain = UNet(channels=4, image_size=14, base_channels=8, channel_mults=(1, 2), attention_resolutions=(7,)).eval()
    plain.load_state_dict(patched.state_dict())
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 400, 999])
    patches = x.reshape(3, 14, 2, 14, 2).permute(0, 2, 4, 1, 3).reshape(3, 4, 14, 14)
    out = plain(patches, t).reshape(3, 2, 2, 14, 14).permute(0, 3, 1, 4, 2).reshape(3, 1, 28, 28)
    assert torch.allclose(patched(x, t), out, atol=1e-5)


@pytest.mark.parametrize("prediction", ["v", "edm"])
def test_a_preconditioned_network_returns_eps_from_its_output_and_saves_only_weights(prediction):
    """--prediction v / edm: forward is c_xt x_t + c_net F(c_in x_t) with F the plain U-Net of the same weights; the
    coefficients are float32 constants (MPS has no float64) rebuilt from the config, so the state dict is the eps
    network's and a checkpoint of either loads into the other's shape."""
    cfg = ModelConfig(base_channels=8, prediction=prediction)
    net, plain = perturbed(build_model(cfg)), build_model(cfg.replace(prediction="eps")).eval()
    assert net.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(net.state_dict())
    c_in, c_xt, c_net = output_coefficients(cfg)
    assert net.c_in.dtype == torch.float32
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 400, 999])
    at = lambda c: c[t].float().view(-1, 1, 1, 1)  # noqa: E731
    assert torch.allclose(net(x, t), at(c_xt) * x + at(c_net) * plain(at(c_in) * x, t), atol=1e-5)


def test_patches_count_in_the_downsampling_factor():
    UNet(image_size=28, channel_mults=(1, 1), patch_size=2)
    with pytest.raises(AssertionError):
        UNet(image_size=28, channel_mults=(1, 2, 2), patch_size=2)  # 28 / 2 = 14, then 7, then 3.5
