"""The baselines of the paper as commands: data-free (dkdm synth + train --data DIR) and data-limited."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dkdm.cli import main
from dkdm.data import Digits, MixedSet, SampleSet, load_dataset
from dkdm.errors import DkdmError

TINY = ["--model", "unet:widths=8-16,layers=1,groups=4", "--batch", "16", "--steps", "3", "--no-progress",
        "--no-report"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "syn"
    assert main(["synth", "--num", "1400", "--steps", "3", "--seed", "4", "--out", str(out), "--no-progress"]) == 0
    return out


def test_synth_writes_a_described_sample_set_from_the_teacher(synth):
    meta = json.loads((synth / "dataset.json").read_text())
    assert meta["format"] == "dkdm-samples" and meta["reference"] == "digits"
    assert meta["teacher"] == "builtin:digits" and meta["steps"] == 3 and meta["seed"] == 4
    assert meta["teacher_sample_steps"] == 1400 * 3
    x = load_file(str(synth / "samples.safetensors"))["samples"]
    assert x.shape == (1400, 1, 8, 8) and x.dtype == torch.float32
    # the teacher clips x0, so samples stay in the data range, and they are not noise
    assert x.abs().max() <= 1.0 + 1e-5 and x.std() > 0.3
    assert (synth / "preview.png").exists()


def test_synth_default_size_is_the_real_train_split(tmp_path, monkeypatch):
    import dkdm.evaluation as ev

    seen = {}
    monkeypatch.setattr(ev, "draw", lambda m, num, *a, **k: seen.setdefault("x", torch.zeros(num, 1, 8, 8)))
    assert main(["synth", "--steps", "2", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert len(seen["x"]) == len(Digits("train")) == 1437


def test_train_on_a_sample_set_records_what_it_learned(synth, tmp_path):
    out = tmp_path / "df"
    assert main(["train", "--data", str(synth), *TINY, "--out", str(out)]) == 0
    cfg = json.loads((out / "dkdm_model.json").read_text())
    assert cfg["data"] == "digits" and cfg["trained_on"] == str(synth)


def test_sample_set_batches_come_from_the_set(synth):
    data = load_dataset(str(synth))
    assert isinstance(data, SampleSet) and data.reference == "digits" and len(data) == 1400
    drawn = data.sample(200, torch.Generator().manual_seed(0))
    rows = data.images.flatten(1)
    assert all((rows == d.flatten()).all(1).any() for d in drawn)


@pytest.mark.parametrize("percent", [5, 20, 100])
def test_data_limited_set_holds_p_percent_real_and_fills_up_with_samples(synth, percent):
    real, syn = Digits("train"), SampleSet(synth)
    mixed = MixedSet(real, syn, percent, seed=1)
    assert len(mixed.images) == len(real.images)
    real_rows, syn_rows = real.images.flatten(1), syn.images.flatten(1)
    from_real = sum(bool((real_rows == m.flatten()).all(1).any()) for m in mixed.images)
    from_syn = sum(bool((syn_rows == m.flatten()).all(1).any()) for m in mixed.images)
    assert from_real == round(len(real.images) * percent / 100) == mixed.num_real
    assert from_real + from_syn == len(real.images)


def test_data_limited_training_runs(synth, tmp_path):
    out = tmp_path / "dl"
    assert main(["train", "--data", "digits", "--real-fraction", "10", "--synthetic", str(synth), *TINY,
                 "--out", str(out)]) == 0
    assert json.loads((out / "dkdm_model.json").read_text())["data"] == "digits"


@pytest.mark.parametrize("extra, message", [
    (["--real-fraction", "10"], "go together"),
    (["--real-fraction", "120", "--synthetic", "SYN"], "percentage in 0..100"),
    (["--real-fraction", "1", "--synthetic", "SYN"], "synthesize at least"),
    (["--real-fraction", "10", "--synthetic", "NOPE"], "sample set written"),
])
def test_bad_baseline_settings_exit_2_with_one_line(synth, tmp_path, capsys, extra, message):
    extra = [str(synth) if e == "SYN" else str(tmp_path / "nope") if e == "NOPE" else e for e in extra]
    assert main(["train", "--data", "digits", *extra, *TINY, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_unknown_data_and_reused_synth_out_are_refused(synth, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none"), *TINY, "--out", str(tmp_path / "o")]) == 2
    assert "neither a built-in data set" in capsys.readouterr().err
    assert main(["synth", "--num", "4", "--steps", "2", "--out", str(synth), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text("{}")
    with pytest.raises(DkdmError, match="cannot read the sample set"):
        SampleSet(bad)
