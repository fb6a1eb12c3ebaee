"""Linear probe: LARS step rule, high accuracy on separable features, chance on random labels,
a tiny model end to end."""

import pytest
import torch

from dream_fast.config import get_preset
from dream_fast.data import make_sample
from dream_fast.eval.features import EvalImages, encode_all, probe_features, to_image_batch
from dream_fast.eval.probe import LARS, linear_probe, train_linear_head
from dream_fast.model.dream import build_model


def _clusters(n, seed, K=5, D=24, spread=1.0):
    g = torch.Generator().manual_seed(100)
    centres = torch.randn(K, D, generator=g) * 3
    g.manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, D, generator=g) + 7.0, y  # offset: BN must remove it


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_probe_separates_separable_features(optimizer):
    res = linear_probe(
        None, _clusters(800, 1), _clusters(400, 2), epochs=20, optimizer=optimizer, batch_size=128
    )
    assert res["top1"] >= 0.97 and res["train_top1"] >= 0.97
    assert res["num_classes"] == 5 and res["num_val"] == 400 and len(res["per_class"]) == 5


def test_probe_is_at_chance_on_random_labels():
    x, _ = _clusters(800, 3)
    xv, _ = _clusters(400, 4)
    g = torch.Generator().manual_seed(5)
    res = train_linear_head(
        x,
        torch.randint(0, 5, (800,), generator=g),
        xv,
        torch.randint(0, 5, (400,), generator=g),
        epochs=10,
        optimizer="adamw",
    )
    assert res["top1"] < 0.3


def test_probe_string_labels_and_unknown_val_class():
    x, y = _clusters(200, 6, K=3)
    names = ["circle", "square", "triangle"]
    res = linear_probe(
        None,
        (x, [names[i] for i in y]),
        (x, [names[i] for i in y]),
        epochs=30,
        batch_size=50,
        optimizer="adamw",
    )
    assert set(res["per_class"]) == set(names) and res["top1"] > 0.9
    with pytest.raises(ValueError, match="never occur"):
        linear_probe(None, (x, ["a"] * 200), (x, ["b"] * 200), epochs=1)


def test_lars_step_is_relative_to_the_weight_norm():
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))  # ||w|| = 8
    b = torch.nn.Parameter(torch.zeros(4))
    opt = LARS([w, b], lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w.grad = torch.full((4, 4), 100.0)
    b.grad = torch.full((4,), 0.5)
    opt.step()
    # update = lr * 0.01 * ||w|| * g/||g|| : norm 0.08, whatever the gradient scale
    assert torch.linalg.vector_norm(w.detach() - 2.0) == pytest.approx(0.08, rel=1e-5)
    torch.testing.assert_close(b.detach(), torch.full((4,), -0.5))  # 1-D: plain SGD


def _tiny_model():
    cfg = get_preset("tiny")
    cfg.model.enc_depth = cfg.model.dec_depth = cfg.model.text_depth = 1
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.loss)


def test_probe_features_are_the_buffer_mean_of_the_unmasked_encoder():
    model = _tiny_model()
    ims = [make_sample(0, "val", i)[0] for i in range(4)]
    x = to_image_batch(ims, 32)
    from dream_fast.eval.features import images_to_tokens

    tokens = images_to_tokens(model, x)
    enc = encode_all(model, tokens)
    S, L = model.buffer_size, model.seq_len
    assert enc.shape == (4, S + L, model.cfg.enc_width)
    torch.testing.assert_close(probe_features(model, tokens), enc[:, :S].mean(1))
    assert model.training  # mode restored after the frozen pass


def test_probe_tiny_random_model_end_to_end(tmp_path):
    from dream_fast.data import shard_pattern, write_shapes_shards

    write_shapes_shards(tmp_path, 96, 48, 0, seed=0, samples_per_shard=64, progress=False)
    model = _tiny_model()
    train = EvalImages(shard_pattern(tmp_path, "train"), 32, label_key="shape_id")
    val = EvalImages(shard_pattern(tmp_path, "val"), 32, label_key="shape_id")
    res = linear_probe(model, train, val, "shape_id", epochs=3, batch_size=32)
    assert res["num_train"] == 96 and res["num_val"] == 48 and res["num_classes"] == 3
    assert 0.0 <= res["top1"] <= 1.0 and set(res["per_class"]) <= {"circle", "square", "triangle"}
    assert all(p.grad is None for p in model.parameters())  # frozen: nothing touched the model
