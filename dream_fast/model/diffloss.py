"""Per-token diffusion head (MAR's DiffLoss): an AdaLN residual MLP predicting [ε, v] for one token
from its condition z, trained with ε-MSE + VLB and sampled by respaced guided DDPM (docs/design.md §1.5)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dream_fast.model.diffusion import GaussianDiffusion, check_weighting

try:  # fused AdaLN residual block (Triton on CUDA, PyTorch reference elsewhere)
    from dream_fast.kernels.adaln_block import adaln_block as _fused_adaln_block
except ImportError:  # kernel not installed yet: the inline math below is the same function
    _fused_adaln_block = None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------- embeddings


class TimestepEmbedder(nn.Module):
    """Scalar timestep → W: sinusoidal frequency embedding (256-d) → Linear → SiLU → Linear."""

    def __init__(self, width: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def frequency_embedding(self, t_N: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps (int or float) → (N, freq_dim) float32 [cos | sin] features."""
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t_N.device) / half
        )
        args_NH = t_N.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args_NH), torch.sin(args_NH)], dim=-1)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        emb = self.frequency_embedding(t_N)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------- blocks


class AdaLNResBlock(nn.Module):
    """x + gate · fc2(SiLU(fc1(LN(x)·(1+scale) + shift))), (shift, scale, gate) = mod(SiLU(y))."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.mod = nn.Linear(width, 3 * width)

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        if _fused_adaln_block is not None:
            # the op takes the raw condition y and applies SiLU before `mod` itself
            return _fused_adaln_block(
                x_NW,
                y_NW,
                self.in_ln.weight,
                self.in_ln.bias,
                self.mod.weight,
                self.mod.bias,
                self.fc1.weight,
                self.fc1.bias,
                self.fc2.weight,
                self.fc2.bias,
                self.in_ln.eps,
            )
        return self.forward_reference(x_NW, y_NW)

    def forward_reference(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mod(F.silu(y_NW)).chunk(3, dim=-1)
        h = modulate(self.in_ln(x_NW), shift, scale)
        return x_NW + gate * self.fc2(F.silu(self.fc1(h)))


class FinalLayer(nn.Module):
    """LN (no affine) → modulate by Linear(SiLU(y)) → Linear W → out (= 2C: ε and v)."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.mod = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(F.silu(y_NW)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x_NW), shift, scale))


class DiffusionHead(nn.Module):
    """MAR's SimpleMLPAdaLN: (x_NC, t_N, z_NZ) → (N, 2C) = [ε, v]; predicts 0 at init."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, num_timesteps: int = 1000):
        super().__init__()
        self.num_timesteps = num_timesteps  # model-time range of t (the training process's T)
        if min(token_dim, cond_dim, width) < 1 or depth < 0:
            raise ValueError(
                f"DiffusionHead needs token_dim, cond_dim, width >= 1 and depth >= 0; got "
                f"token_dim={token_dim}, cond_dim={cond_dim}, width={width}, depth={depth}"
            )
        self.token_dim, self.cond_dim, self.width, self.depth = token_dim, cond_dim, width, depth
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # zero modulation makes every block the identity and the output exactly 0 at init
        for blk in self.blocks:
            nn.init.zeros_(blk.mod.weight)
            nn.init.zeros_(blk.mod.bias)
        for lin in (self.final_layer.mod, self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x_NC: torch.Tensor, t_N: torch.Tensor, z_NZ: torch.Tensor | None = None,
                cond_NW: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 2C) = [eps, v]. Pass z (N, Z), or its embedding cond_NW = cond_embed(z) when the
        caller repeats rows (training computes it once per token, not once per repeat)."""
        if x_NC.dim() != 2 or x_NC.shape[1] != self.token_dim:
            raise ValueError(f"x must be (N, token_dim={self.token_dim}), got {tuple(x_NC.shape)}")
        dtype = self.input_proj.weight.dtype
        if cond_NW is None:
            if z_NZ is None or z_NZ.dim() != 2 or z_NZ.shape[1] != self.cond_dim or z_NZ.shape[0] != x_NC.shape[0]:
                shape = None if z_NZ is None else tuple(z_NZ.shape)
                raise ValueError(f"z must be (N={x_NC.shape[0]}, cond_dim={self.cond_dim}), got {shape}")
            cond_NW = self.cond_embed(z_NZ.to(dtype))
        x = self.input_proj(x_NC.to(dtype))
        y = self.embed_time(t_N) + cond_NW
        for blk in self.blocks:
            x = blk(x, y)
        return self.final_layer(x, y)

    def embed_time(self, t_N: torch.Tensor) -> torch.Tensor:
        """Timestep embedding; for many rows, embed every timestep once and index the table
        (same values and gradients, ~10x fewer FLOPs in training where N >> T)."""
        T = self.num_timesteps
        if t_N.shape[0] > 2 * T:
            table = self.time_embed(torch.arange(T, device=t_N.device))
            return table.index_select(0, t_N)
        return self.time_embed(t_N)


# ----------------------------------------------------------------------------- loss + sampler


class DiffLoss(nn.Module):
    """Diffusion loss and sampler for one token given its condition z.

    Every parameter here is "the diffusion head": the optimizer exempts it from weight decay
    (docs/design.md §1.8). The decoder owns it as attribute `diffloss`, so the exempt names start with
    `no_weight_decay_prefix` ("diffloss."); parameters are `net.input_proj.*`, `net.time_embed.mlp.*`,
    `net.cond_embed.*`, `net.blocks.{i}.{in_ln,mod,fc1,fc2}.*`, `net.final_layer.{mod,linear}.*`.
    """

    no_weight_decay_prefix = "diffloss."

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int,
        depth: int,
        num_train_timesteps: int = 1000,
        num_sampling_steps: int = 100,
        schedule: str = "cosine",
        diffusion_batch_mul: int = 4,
        weighting: str = "eps",
        detail_weight: float = 0.0,
        token_channels: int = 1,
    ):
        super().__init__()
        if diffusion_batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be >= 1, got {diffusion_batch_mul}")
        check_weighting(weighting)
        if detail_weight < 0:
            raise ValueError(f"detail_weight must be >= 0, got {detail_weight}")
        if token_channels < 1 or token_dim % token_channels:
            raise ValueError(f"token_channels must divide token_dim={token_dim}, got {token_channels}")
        self.weighting = weighting
        self.detail_weight, self.token_channels = detail_weight, token_channels
        self.token_dim, self.cond_dim = token_dim, cond_dim
        self.diffusion_batch_mul = diffusion_batch_mul
        self.net = DiffusionHead(token_dim, cond_dim, width, depth, num_train_timesteps)
        # plain objects (not buffers): tables stay fp32 under .half()/bf16 casts and out of checkpoints
        self.train_diffusion = GaussianDiffusion(num_train_timesteps, schedule)
        self.sample_diffusion = GaussianDiffusion(num_train_timesteps, schedule, respacing=num_sampling_steps)

    def _diffusions_on(self, device: torch.device) -> None:
        for d in (self.train_diffusion, self.sample_diffusion):
            if d.device != device:
                d.to(device)

    def forward(
        self, target_NC: torch.Tensor, z_NZ: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Mean loss/mse/vb over N·diffusion_batch_mul rows (loss token-weighted when detail_weight > 0);
        pass only the tokens to predict."""
        if target_NC.dim() != 2 or target_NC.shape[1] != self.token_dim:
            raise ValueError(f"target must be (N, token_dim={self.token_dim}), got {tuple(target_NC.shape)}")
        if z_NZ.dim() != 2 or z_NZ.shape[0] != target_NC.shape[0] or z_NZ.shape[1] != self.cond_dim:
            raise ValueError(
                f"z must be (N={target_NC.shape[0]}, cond_dim={self.cond_dim}), got {tuple(z_NZ.shape)}"
            )
        device = target_NC.device
        self._diffusions_on(device)
        mul = self.diffusion_batch_mul
        target = target_NC.repeat(mul, 1)
        cond = self.net.cond_embed(z_NZ.to(self.net.cond_embed.weight.dtype)).repeat(mul, 1)
        d = self.train_diffusion
        gen = {} if generator is None else {"generator": generator}  # no kwarg: torch.compile-friendly
        t = torch.randint(0, d.num_timesteps, (target.shape[0],), device=device, **gen)
        noise = torch.randn(target.shape, device=device, **gen)
        terms = d.training_losses(self.net, target, t, {"cond_NW": cond}, noise=noise, weighting=self.weighting)
        out = {k: v.mean() for k, v in terms.items()}
        if self.detail_weight > 0:
            w = self.token_weights(target_NC).repeat(mul)
            out["loss"] = (terms["loss"] * w).mean()
        return out

    @torch.no_grad()
    def token_weights(self, target_NC: torch.Tensor) -> torch.Tensor:
        """(N,) 1 + detail_weight * spatial std of each token (layout (channels, positions)), mean 1."""
        x = target_NC.float().reshape(target_NC.shape[0], self.token_channels, -1)
        w = 1.0 + self.detail_weight * x.std(dim=-1, unbiased=False).mean(dim=-1)
        return w / w.mean()

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        temperature: float | torch.Tensor = 1.0,
        cfg: torch.Tensor | float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Tokens (N, C). cfg None: z is (N, Z). cfg given: z is [cond; uncond] (2N, Z), cfg float or (N,)."""
        if z.dim() != 2 or z.shape[1] != self.cond_dim:
            raise ValueError(f"z must be (rows, cond_dim={self.cond_dim}), got {tuple(z.shape)}")
        if cfg is not None and z.shape[0] % 2:
            raise ValueError(
                f"with cfg, z must stack [cond; uncond] (an even number of rows), got {z.shape[0]}"
            )
        n = z.shape[0] if cfg is None else z.shape[0] // 2
        self._diffusions_on(z.device)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x, t, z)

        return self.sample_diffusion.p_sample_loop(
            model_fn,
            (n, self.token_dim),
            noise=noise,
            temperature=temperature,
            cfg=cfg,
            generator=generator,
            device=z.device,
        )
