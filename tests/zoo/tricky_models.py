"""Hand-written small models that exercise the corners of prunekit's channel analysis.

``TRICKY = {name: (factory, example_input_factory)}``: ``factory()`` builds a fresh model,
``example_input_factory(batch=2)`` builds an input (a tensor, a tuple of tensors or a dict of
keyword tensors) for a given batch size.  Everything is tiny so the whole zoo runs in seconds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _img(c=3, h=8, w=8):
    return lambda batch=2: torch.randn(batch, c, h, w)


def cbr(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())


# ---------------------------------------------------------------- plain CNN and residual-style merges
class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 8), cbr(8, 12), nn.MaxPool2d(2), cbr(12, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ResidualAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        y = self.conv2(F.relu(self.conv1(F.relu(s))))
        return self.head(F.relu(y + s))


class ResidualSubMulDiv(nn.Module):
    """a - b, a * gate (N,C,1,1 broadcast), a / (N,1,H,W broadcast), a * per-channel (C,1,1) param."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.a(x)
        d = self.b(a) - a
        gate = torch.sigmoid(self.g(d).mean((2, 3), keepdim=True))  # (N, C, 1, 1)
        y = d * gate
        y = y / (1.0 + torch.sigmoid(x.mean(1, keepdim=True)))  # (N, 1, H, W)
        y = y * self.scale
        return self.head(y)


class DenseConcat(nn.Module):
    """DenseNet-like: every layer sees the concat of all previous feature maps."""

    def __init__(self, c0=6, growth=4, n=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        self.layers = nn.ModuleList()
        c = c0
        for _ in range(n):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.trans = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.trans(torch.cat(feats, 1))


class SplitChunkNarrow(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.p1 = nn.Conv2d(4, 4, 3, padding=1)
        self.p2 = nn.Conv2d(8, 4, 1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.q = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(4 + 4 + 4 + 3 + 3, 5, 1)

    def forward(self, x):
        s = self.stem(x)
        a, b = torch.split(s, [4, 8], dim=1)  # literal sizes: pruning must pin or keep these
        u = self.p1(a)
        v = self.p2(b)
        m = self.mid(b)
        c1, c2 = m.chunk(2, dim=1)
        n1 = torch.narrow(m, 1, 2, 3)
        return self.head(torch.cat([u, v + c1, c2, self.q(n1), n1], 1))


class Slicing(nn.Module):
    """x[:, :k] and x[:, k:] feed different consumers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.left = nn.Conv2d(4, 6, 1)
        self.right = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        return self.head(self.left(s[:, :4]) + self.right(s[:, 4:]))


class Unbind(nn.Module):
    """(N, 3C, H, W) -> (N, 3, C, H, W).unbind(1): the 3 is pinned, C stays prunable."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Conv2d(3, 3 * 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        a, b, c = self.qkv(x).reshape(n, 3, -1, h, w).unbind(1)
        return self.head(a * torch.sigmoid(b) + c)


class FlattenLinear(nn.Module):
    """conv -> flatten(C*H*W) -> Linear, and a view/reshape variant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv(x))))
        y = y.flatten(1)
        y = F.relu(self.fc1(y))
        y = y.view(y.shape[0], 4, -1).reshape(y.shape[0], -1)  # the literal 4 hard-codes a size
        return self.fc2(y)


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: permute to channels-last, Linear-GELU-Linear, permute back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        y = s.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        y = y.permute(0, 3, 1, 2)
        y = y + s
        z = y.transpose(1, 3)  # (N, W, H, C)
        return self.head(z.transpose(1, 3).contiguous())


class ShuffleView(nn.Module):
    """ShuffleNet channel shuffle written with view/transpose/view between grouped convs."""

    def __init__(self, groups=2):
        super().__init__()
        self.groups = groups
        self.stem = nn.Conv2d(3, 8, 1)
        self.g1 = nn.Conv2d(8, 8, 1, groups=groups)
        self.g2 = nn.Conv2d(8, 8, 1, groups=groups)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.g1(F.relu(self.stem(x))))
        n, c, h, w = y.shape
        y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(F.relu(self.g2(y)))


class ShuffleModule(nn.Module):
    """nn.ChannelShuffle (the aten channel_shuffle op)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.shuffle = nn.ChannelShuffle(2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.shuffle(F.relu(self.stem(x))))


class PixelShuffleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6 * 4, 3, padding=1)
        self.ps = nn.PixelShuffle(2)
        self.out = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        return self.out(F.relu(self.ps(self.conv(x))))


class PixelUnshuffleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.pu = nn.PixelUnshuffle(2)
        self.out = nn.Conv2d(5 * 4, 4, 1)

    def forward(self, x):
        return self.out(self.pu(F.relu(self.conv(x))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                                 nn.Conv1d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                                 nn.Conv1d(8, 6, 1))

    def forward(self, x):
        return self.net(x).mean(-1)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(),
                                 nn.Conv3d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                                 nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.pw2(F.relu(self.bn(self.dw(F.relu(self.pw1(x))))))


class DepthwiseMultiplier(nn.Module):
    """Depthwise conv with channel multiplier 2 (groups=C_in, C_out=2*C_in)."""

    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.pw2 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.pw2(F.relu(self.dw(F.relu(self.pw1(x)))))


class ConvTransposeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(6, 8, 3, padding=1, groups=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(F.relu(self.up2(F.relu(self.up1(F.relu(self.c1(x)))))))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))

    def forward(self, x):
        return self.net(x)


class BilinearMatmul(nn.Module):
    """A free weight matrix used with @ (x @ W) between two Linears."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.W = nn.Parameter(torch.randn(8, 10) / 3)
        self.out = nn.Linear(10, 4)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.out(F.relu(h @ self.W))


class EmbeddingLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, ids):
        return self.fc2(F.relu(self.fc1(self.emb(ids))))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.fc = nn.Linear(6, 10)
        self.ln = nn.LayerNorm(10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        y = F.relu(self.gn(self.c2(y)))
        y = F.relu(self.inorm(self.c3(y)))
        y = y.mean((2, 3))
        return self.out(F.relu(self.ln(self.fc(y))))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNorm2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = LayerNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.norm(self.c1(x)))


class PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.act2 = nn.PReLU()  # single shared slope
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c3(self.act2(self.c2(self.act(self.c1(x)))))


class PoolUpsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        a = F.relu(self.c1(x))  # 16x16
        b = F.max_pool2d(a, 2)  # 8x8
        b = F.relu(self.c2(b))
        c = F.avg_pool2d(b, 2)  # 4x4
        c = F.interpolate(c, scale_factor=2, mode="nearest")  # 8x8
        c = c + F.adaptive_avg_pool2d(b, 1) + F.adaptive_max_pool2d(b, (8, 8))
        c = F.interpolate(c, size=(16, 16), mode="bilinear", align_corners=False)
        d = F.relu(self.c3(c + a))
        return self.head(d)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        s = F.adaptive_avg_pool2d(y, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return self.c2(y * s)


class MatmulAttention(nn.Module):
    """Attention written by hand: view into heads, q @ k.transpose * scale, softmax, @ v."""

    def __init__(self, dim=12, num_heads=3):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(y)


class MatmulAttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.attn = MatmulAttention(12, 3)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.attn(h))


class SDPAAttention(nn.Module):
    def __init__(self, dim=12, num_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                           scale=1.0 / math.sqrt(6))
        return self.o(y.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class SDPANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.attn = SDPAAttention(12, 2)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(self.attn(F.gelu(self.inp(x))))


class TorchMHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(a)


class FreeParams(nn.Module):
    """ViT-style: patch-embed conv, cls_token cat, pos_embed add, layer-scale gamma mul."""

    def __init__(self, dim=8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + 4, dim))
        self.fc1 = nn.Linear(dim, 16)
        self.fc2 = nn.Linear(16, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, 4, dim)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.pos_embed
        t = t + self.gamma * self.fc2(F.gelu(self.fc1(t)))
        return self.head(t[:, 0])


class SharedLinear(nn.Module):
    """The same Linear applied twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = F.relu(self.shared(h))
        h = F.relu(self.shared(h))
        return self.out(h)


class TiedEmbedding(nn.Module):
    """A language-model head whose weight *is* the embedding weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.lm_head(h)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Linear(4, 8)
        self.mix = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, image, extra):
        y = F.relu(self.img(image)) + self.aux(extra)[:, :, None, None]
        y = F.relu(self.mix(y)).mean((2, 3))
        return self.head(y)


class KwargsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 10)
        self.gate = nn.Linear(3, 10)
        self.out = nn.Linear(10, 2)

    def forward(self, features, context, scale=None):
        h = F.relu(self.enc(features)) * torch.sigmoid(self.gate(context))
        if scale is not None:
            h = h * scale
        return self.out(h)


class TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.cls = nn.Linear(8, 5)
        self.seg = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = F.relu(self.body(F.relu(self.stem(x))))
        return self.cls(f.mean((2, 3))), self.seg(f)


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.logits = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        return {"logits": self.logits(F.relu(self.a(s))), "aux": self.b(s).sum(1)}


class NestedContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
            nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 6, 1)]),
            nn.ModuleDict({"norm": nn.BatchNorm2d(6), "proj": nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU())}),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Sequential(nn.Linear(6, 4)))

    def forward(self, x):
        stem, blocks, named = self.body
        y = stem(x)
        for conv in blocks:
            y = F.relu(conv(y))
        y = named["proj"](named["norm"](y))
        return self.head(y)


class InplaceOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.w = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.act(self.c1(x))
        b = self.c2(a)
        b.relu_()
        b.add_(a)
        b.mul_(self.w)
        b.mul_(0.5)
        return self.c3(b)


# ---------------------------------------------------------------- ops prunekit cannot follow (must pin)
class SortChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y, _ = torch.sort(self.c1(x), dim=1)
        return self.c2(y)


class GatherChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        idx = y.abs().argsort(dim=1)  # data-dependent permutation of channels
        return self.c2(torch.gather(y, 1, idx))


class FFTChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        y = torch.fft.rfft(self.c1(x), dim=1).abs()  # 8 channels -> 5 frequencies
        return self.c2(y)


class UnknownElementwise(nn.Module):
    """An elementwise op with no rule (lgamma): its channels must be pinned and reported."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = torch.lgamma(F.softplus(self.c1(x)) + 1.0)
        return self.c3(F.relu(self.c2(y)))


def _ids(vocab, t=5):
    return lambda batch=2: torch.randint(0, vocab, (batch, t))


TRICKY = {
    "plain_cnn": (PlainCNN, _img(3, 8, 8)),
    "residual_add": (ResidualAdd, _img()),
    "residual_sub_mul_div": (ResidualSubMulDiv, _img()),
    "dense_concat": (DenseConcat, _img()),
    "split_chunk_narrow": (SplitChunkNarrow, _img()),
    "slicing": (Slicing, _img()),
    "unbind": (Unbind, _img()),
    "flatten_linear": (FlattenLinear, _img()),
    "channels_last_mlp": (ChannelsLastMLP, _img()),
    "shuffle_view": (ShuffleView, _img()),
    "shuffle_module": (ShuffleModule, _img()),
    "pixel_shuffle": (PixelShuffleModel, _img()),
    "pixel_unshuffle": (PixelUnshuffleModel, _img()),
    "conv1d": (Conv1dNet, lambda batch=2: torch.randn(batch, 4, 16)),
    "conv3d": (Conv3dNet, lambda batch=2: torch.randn(batch, 2, 4, 6, 6)),
    "grouped_conv": (GroupedConv, _img()),
    "depthwise": (Depthwise, _img()),
    "depthwise_multiplier": (DepthwiseMultiplier, _img()),
    "conv_transpose": (ConvTransposeNet, _img()),
    "mlp": (MLP, lambda batch=2: torch.randn(batch, 10)),
    "bilinear_matmul": (BilinearMatmul, lambda batch=2: torch.randn(batch, 3, 6)),
    "embedding_linear": (EmbeddingLinear, _ids(20)),
    "norms": (Norms, _img()),
    "layernorm2d": (LayerNorm2dNet, _img()),
    "prelu": (PReLUNet, _img()),
    "pool_upsample": (PoolUpsample, _img(3, 16, 16)),
    "squeeze_excite": (SqueezeExcite, _img()),
    "matmul_attention": (MatmulAttentionNet, lambda batch=2: torch.randn(batch, 4, 5)),
    "sdpa_attention": (SDPANet, lambda batch=2: torch.randn(batch, 4, 5)),
    "torch_mha": (TorchMHANet, lambda batch=2: torch.randn(batch, 4, 5)),
    "free_params": (FreeParams, _img(3, 8, 8)),
    "shared_linear": (SharedLinear, lambda batch=2: torch.randn(batch, 6)),
    "tied_embedding": (TiedEmbedding, _ids(16)),
    "two_inputs": (TwoInputs, lambda batch=2: (torch.randn(batch, 3, 8, 8), torch.randn(batch, 4))),
    "kwargs_input": (KwargsInput, lambda batch=2: {"features": torch.randn(batch, 6),
                                                   "context": torch.randn(batch, 3)}),
    "tuple_output": (TupleOutput, _img()),
    "dict_output": (DictOutput, _img()),
    "nested_containers": (NestedContainers, _img()),
    "inplace_ops": (InplaceOps, _img()),
    "unknown_sort": (SortChannels, _img()),
    "unknown_gather": (GatherChannels, _img()),
    "unknown_fft": (FFTChannels, _img()),
    "unknown_elementwise": (UnknownElementwise, _img()),
}
