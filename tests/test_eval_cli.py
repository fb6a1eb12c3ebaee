"""`dream-fast eval ...` on a tiny random bundle written with save_pretrained: probe, zeroshot,
retrieval, align, oracle, and fid's error path."""

import json

import pytest
from bundle_helpers import tiny_bundle

from dream_fast.cli import main
from dream_fast.data import make_sample, shard_pattern, write_shapes_shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    bundle = tiny_bundle(root / "bundle")
    shards = root / "shards"
    write_shapes_shards(shards, 64, 32, 16, seed=0, samples_per_shard=32, progress=False)
    gen = root / "gen"  # stands in for generated images: PNG + prompt + meta sidecars
    gen.mkdir()
    for split, n in (("val", 20), ("heldout", 10)):
        for i in range(n):
            im, cap, meta = make_sample(3, split, i)
            im.save(gen / f"{split}{i:03d}.png")
            (gen / f"{split}{i:03d}.txt").write_text(cap)
            (gen / f"{split}{i:03d}.json").write_text(json.dumps(meta))
    classes = root / "classes"
    for i in range(24):
        im, _, meta = make_sample(0, "train", i)
        (classes / meta["shape"]).mkdir(parents=True, exist_ok=True)
        im.save(classes / meta["shape"] / f"{i}.png")
    return {"bundle": str(bundle), "shards": shards, "gen": str(gen), "classes": str(classes), "root": root}


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out


def test_cli_probe_on_shards_and_class_folders(setup, capsys, tmp_path):
    tr = ",".join(shard_pattern(setup["shards"], "train"))
    va = ",".join(shard_pattern(setup["shards"], "val"))
    out_json = tmp_path / "probe.json"
    rc, out = _run(
        [
            "eval",
            "probe",
            "--checkpoint",
            setup["bundle"],
            "--train",
            tr,
            "--val",
            va,
            "--label-key",
            "colour_id",
            "--epochs",
            "3",
            "--out",
            str(out_json),
        ],
        capsys,
    )
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res == json.loads(out_json.read_text())
    assert res["num_train"] == 64 and res["num_val"] == 32 and 0 <= res["top1"] <= 1
    assert set(res["per_class"]) <= {"red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"}
    rc, out = _run(
        [
            "eval",
            "probe",
            "--checkpoint",
            setup["bundle"],
            "--train",
            setup["classes"],
            "--val",
            setup["classes"],
            "--epochs",
            "2",
            "--optimizer",
            "adamw",
        ],
        capsys,
    )
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["num_train"] == 24 and set(res["per_class"]) <= {"circle", "square", "triangle"}


def test_cli_zeroshot_retrieval_align(setup, capsys):
    va = ",".join(shard_pattern(setup["shards"], "val"))
    rc, out = _run(
        [
            "eval",
            "zeroshot",
            "--checkpoint",
            setup["bundle"],
            "--data",
            va,
            "--label-key",
            "shape_id",
            "--prompts-per-class",
            "4",
        ],
        capsys,
    )
    assert rc == 0, out.err
    assert json.loads(out.out)["n"] == 32
    rc, out = _run(["eval", "retrieval", "--checkpoint", setup["bundle"], "--data", setup["gen"]], capsys)
    assert rc == 0, out.err
    assert json.loads(out.out)["n"] == 30
    rc, out = _run(["eval", "align", "--checkpoint", setup["bundle"], "--data", setup["gen"]], capsys)
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["n"] == 30 and -100 <= res["score"] <= 100


def test_cli_oracle_on_a_folder_and_selftest(setup, capsys):
    va = ",".join(shard_pattern(setup["shards"], "val"))
    rc, out = _run(["eval", "oracle", "--data", setup["gen"], "--fd-ref", va, "--selftest", "50"], capsys)
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["seen"]["n"] == 20 and res["heldout"]["n"] == 10
    assert res["overall"]["all"] == 1.0  # clean renders stand in for generated images
    assert res["selftest"]["overall"]["n"] == 100 and res["selftest"]["overall"]["all"] >= 0.99
    assert res["shapes_fd"] >= -1e-6


def test_cli_errors_are_one_line(setup, capsys):
    rc, out = _run(["eval", "fid", "--gen", setup["gen"], "--ref", "x.npz"], capsys)
    assert rc == 2 and "--inception-weights" in out.err
    rc, out = _run(
        [
            "eval",
            "probe",
            "--checkpoint",
            str(setup["root"] / "nope"),
            "--train",
            setup["gen"],
            "--val",
            setup["gen"],
        ],
        capsys,
    )
    assert rc == 2 and "does not exist" in out.err
    rc, out = _run(["eval", "oracle"], capsys)
    assert rc == 2 and "--data" in out.err
