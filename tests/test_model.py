"""DREAM model: encoder-on-visible equivalence, both eligibility rules, gradients everywhere, CFG parts."""


import pytest
import torch

from dream_fast.config import get_preset
from dream_fast.model.dream import build_model
from dream_fast.model.masking import num_masked, random_orders, split_order


def _tiny(**model_overrides):
    cfg = get_preset("tiny")
    cfg.model.enc_depth = cfg.model.dec_depth = 2
    for k, v in model_overrides.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.loss)


def _batch(cfg, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, cfg.model.seq_len, cfg.model.token_dim, generator=g)
    ids = torch.zeros(B, cfg.model.text_context, dtype=torch.long)
    ids[:, 0] = 1
    ids[:, 1:5] = torch.randint(3, cfg.model.vocab_size, (B, 4), generator=g)
    ids[:, 5] = 2
    return tokens, ids, g


def test_encoder_on_visible_equals_masked_full_sequence():
    cfg, model = _tiny()
    model.eval()
    tokens, _, g = _batch(cfg)
    L, S = cfg.model.seq_len, cfg.model.buffer_size
    order = random_orders(tokens.shape[0], L, generator=g)
    _, keep = split_order(order, 40)
    enc = model.encode(tokens, keep)  # (B, S + K, D)

    # full sequence: every token embedded, masked ones hidden from attention by a key mask
    x = model.z_proj(tokens)
    x = torch.cat([model.buffer.expand(x.shape[0], -1, -1), x], 1) + model.enc_pos
    x = model.z_proj_ln(x)
    key_mask = torch.zeros(x.shape[0], S + L, dtype=torch.bool)
    key_mask[:, :S] = True
    key_mask.scatter_(1, keep + S, True)
    for blk in model.encoder_blocks:
        x = blk(x, key_mask)
    x = model.encoder_norm(x)
    rows = torch.cat([torch.arange(S).expand(x.shape[0], -1), keep + S], 1)
    full = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
    torch.testing.assert_close(enc, full, atol=1e-5, rtol=1e-5)


def _grads_everywhere(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("ratio,diff_on,clip_on", [(0.6, True, True), (0.3, False, True), (0.9, True, False)])
def test_eligibility_rules_and_gradients(ratio, diff_on, clip_on):
    cfg, model = _tiny()
    model.train()
    tokens, ids, g = _batch(cfg)
    L = cfg.model.seq_len
    m = num_masked(ratio, L)
    out = model(tokens, ids, m, random_orders(tokens.shape[0], L, generator=g), generator=g)
    assert torch.isfinite(out["loss"])
    assert (out["loss_diff"] != 0) == diff_on
    assert (out["loss_clip"] != 0) == clip_on
    expected = cfg.loss.diff_weight * out["loss_diff"] + cfg.loss.clip_weight * out["loss_clip"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    _grads_everywhere(model)
    if not diff_on:
        assert model.diffloss.net.input_proj.weight.grad.abs().max() == 0
        assert model.decoder_blocks[0].mlp.fc1.weight.grad.abs().max() == 0


def test_precomputed_text_path_and_missing_text_error():
    cfg = get_preset("bench_ref_tiny")
    cfg.model.img_size = 32  # 4x4 latent grid of patch 2 -> 4 tokens; keeps the test fast
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    tokens, ids, g = _batch(cfg, B=4)
    order = random_orders(4, cfg.model.seq_len, generator=g)
    emb = torch.randn(4, cfg.model.t5_len, cfg.model.t5_dim)
    mask = torch.ones(4, cfg.model.t5_len, dtype=torch.bool)
    out = model(tokens, ids, cfg.model.seq_len - 1, order, emb, mask)
    out["loss"].backward()
    _grads_everywhere(model)
    with pytest.raises(ValueError, match="text_emb_BTE"):
        model(tokens, ids, cfg.model.seq_len - 1, order)


def test_caption_dropout_uses_empty_caption():
    cfg, model = _tiny()
    model.eval()
    _, ids, _ = _batch(cfg, B=3)
    _, hid, mask = model.text_features(ids)
    dropped = model.text_condition(hid, mask, torch.tensor([True, False, True]))
    null = model.null_condition(3)
    torch.testing.assert_close(dropped.tokens[0], null.tokens[0])
    torch.testing.assert_close(dropped.tokens[2], null.tokens[2])
    assert not torch.allclose(dropped.tokens[1], null.tokens[1])


def test_param_groups_exclude_head_bias_and_1d():
    cfg, model = _tiny()
    decay, no_decay = model.param_groups(0.04)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].startswith("diffloss.") for p in decay["params"])
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0


def test_sincos_position_init_is_spatial_and_learned():
    cfg, model = _tiny(pos_init="sincos")
    S, grid = cfg.model.buffer_size, cfg.model.grid
    for table in (model.enc_pos[S:], model.dec_pos[S:], model.diffusion_pos):
        t = torch.nn.functional.normalize(table.detach(), dim=-1).reshape(grid, grid, -1)
        near = (t[0, 0] @ t[0, 1]).item()  # horizontal neighbours
        below = (t[0, 0] @ t[1, 0]).item()  # vertical neighbours
        far = (t[0, 0] @ t[grid - 1, grid - 1]).item()  # opposite corners
        assert near > 0.9 and below > 0.9 and far < 0.5, (near, below, far)
        assert table.requires_grad
    assert model.enc_pos[:S].abs().max() < 0.2  # buffer positions keep the small normal init
    _, plain = _tiny(pos_init="normal")
    t = torch.nn.functional.normalize(plain.dec_pos[S:].detach(), dim=-1)
    assert (t[0] @ t[1]).abs() < 0.5  # the normal init has no spatial structure


def test_sincos_needs_width_divisible_by_four():
    from dream_fast.model.dream import sincos_2d

    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 30)


def test_text_condition_is_normalised_whatever_the_input_scale():
    # the decoder's cross-attention keys/values come from the aligner: they must stay bounded
    cfg, model = _tiny()
    with torch.no_grad():
        for blk in model.text_aligner.blocks:  # a trained aligner's residual stream can grow large
            blk.mlp.fc2.weight.mul_(50.0)
        text = torch.randn(3, cfg.model.text_cond_len, cfg.model.text_cond_dim) * 100.0
        mask = torch.ones(3, cfg.model.text_cond_len, dtype=torch.bool)
        tokens = model.text_condition(text, mask).tokens
    std = tokens.std(dim=-1, unbiased=False)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("tower_grad", [False, True])
def test_tower_features_reach_decoder_detached_unless_asked(tower_grad):
    cfg, model = _tiny(tower_cond_grad=tower_grad)
    model.train()
    with torch.no_grad():  # leave the head's zero init, or no gradient reaches z at all
        for p in model.diffloss.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tokens, ids, g = _batch(cfg)
    L = cfg.model.seq_len
    out = model(tokens, ids, num_masked(0.9, L), random_orders(tokens.shape[0], L, generator=g), generator=g)
    assert out["loss_clip"] == 0 and out["loss_diff"] > 0  # 90% masked: diffusion only
    out["loss"].backward()
    _grads_everywhere(model)
    tower_grad_max = model.text_tower.token_embedding.weight.grad.abs().max()
    assert (tower_grad_max > 0) == tower_grad
    assert model.text_aligner.proj.weight.grad.abs().max() > 0  # the aligner always learns


@pytest.mark.parametrize("cond_embed", [False, True])
def test_tower_cond_embed_lets_a_word_the_tower_ignores_reach_the_decoder(cond_embed):
    cfg, model = _tiny(tower_cond_embed=cond_embed)
    with torch.no_grad():  # a tower whose output ignores every word
        model.text_tower.ln_final.weight.zero_()
        model.text_tower.ln_final.bias.zero_()
    _, ids, _ = _batch(cfg)
    swapped = ids.clone()
    swapped[:, 3] = 3 + (ids[:, 3] - 3 + 1) % (cfg.model.vocab_size - 3)
    with torch.no_grad():
        h, h_swapped = model.text_features(ids)[1], model.text_features(swapped)[1]
        cond, cond_swapped = (model.text_condition(x, torch.ones(x.shape[:2], dtype=torch.bool)).tokens
                              for x in (h, h_swapped))
    changed = (h - h_swapped).abs().amax(-1) > 1e-4  # (B, T): which positions the swap reached
    if cond_embed:
        assert changed[:, 3].all() and not changed[:, :3].any() and not changed[:, 4:].any()
        assert not torch.allclose(cond, cond_swapped)  # and through the aligner
    else:
        assert not changed.any()
        torch.testing.assert_close(cond, cond_swapped)
