"""Model cards and Hub pushes: the card a real run writes, the upload through a stand-in for
huggingface_hub's API (no network), and the one-line error when the Hub cannot be reached."""

import pytest

from dkdm.cli import main
from dkdm.formats.hub import PRIVATE, push


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    teacher, out = root / "teacher", root / "run"
    assert main(["train", "--data", "digits", "--model", "unet:widths=8-16,layers=1,groups=4", "--diffusion-steps",
                 "20", "--steps", "10", "--batch", "16", "--no-progress", "--no-report", "--out", str(teacher)]) == 0
    assert main(["distill", "--teacher", str(teacher), "--student", "unet:widths=8-16,layers=1,groups=4", "--batch", "8",
                 "--rho", "0.5", "--steps", "6", "--eval-num", "64", "--eval-steps", "5", "--no-progress",
                 "--out", str(out)]) == 0
    return out


def test_every_run_writes_a_model_card_in_the_hubs_format(run):
    from dkdm.formats import load_model
    from dkdm.students import count_parameters

    card = (run / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: diffusers" in front and "pipeline_tag: unconditional-image-generation" in front
    assert "- dkdm\n" in front and "- data-free-distillation\n" in front
    student = count_parameters(load_model(run).net)
    teacher = count_parameters(load_model(run.parent / "teacher").net)
    assert f"- parameters: {student:,} (teacher: {teacher:,}, {student / teacher:.2f}x)" in body
    assert "| student | digits_fid " in body and "(64 samples, 5 steps)" in body and "| teacher | digits_fid" in body
    assert "![samples](samples.png)" in body and (run / "samples.png").is_file()
    assert 'pipe = DDPMPipeline.from_pretrained("run")' in body
    assert f"dkdm distill --seed 0 --steps 6 --batch 8" in body and "--teacher " + str(run.parent / "teacher") in body
    assert (run / "training.png").is_file()  # every run draws its curves, watched or not


class StandIn:
    """Records what huggingface_hub's HfApi would have been asked to do."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, ignore_patterns=(), commit_message=""):
        import fnmatch
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        sent = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in ignore_patterns)]
        self.calls.append(("upload_folder", repo_id, sent))


def test_push_uploads_the_model_directory_without_training_state(run):
    api = StandIn()
    assert push(run, "someone/digits-student", private=True, api=api) == "https://huggingface.co/someone/digits-student"
    assert api.calls[0] == ("create_repo", "someone/digits-student", True, True)
    sent = api.calls[1][2]
    assert {"README.md", "model_index.json", "dkdm_model.json", "samples.png", "metrics.json"} <= set(sent)
    assert any(f.startswith("unet/") for f in sent) and not any(f.startswith("checkpoints/") for f in sent)
    assert "checkpoints/*" in PRIVATE and (run / "checkpoints").is_dir()


@pytest.mark.parametrize("argv, message", [
    (["push", "RUN", "not-a-repo-id"], "must look like USER/NAME"),
    (["push", "NOWHERE", "someone/x"], "is not a model directory"),
    (["push", "RUN", "someone/x"], "cannot push"),
])
def test_push_mistakes_and_an_unreachable_hub_are_one_line(run, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: huggingface_hub refuses at once
    argv = [{"RUN": str(run), "NOWHERE": str(tmp_path)}.get(a, a) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dkdm push: error: ") and message in err[0], err
    if message == "cannot push":
        assert "dkdm push" in err[0].split("error:")[1] and "HF_TOKEN" in err[0]


def test_push_to_hub_is_checked_before_the_run(tmp_path, capsys):
    assert main(["distill", "--push-to-hub", "no slash", "--out", str(tmp_path / "r")]) == 2
    assert "must look like USER/NAME" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_redraws_a_runs_curves(run, capsys):
    (run / "training.png").unlink()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "training.png")]
    assert (run / "training.png").stat().st_size > 1000


def test_push_to_hub_uploads_the_finished_run_with_its_card(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    api = StandIn()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    out = tmp_path / "pushed"
    assert main(["distill", "--teacher", str(run.parent / "teacher"), "--student", "unet:widths=8-16,layers=1,groups=4",
                 "--batch", "8", "--rho", "0.5", "--steps", "2", "--no-report", "--no-progress",
                 "--push-to-hub", "someone/pushed", "--out", str(out)]) == 0
    assert "pushed to https://huggingface.co/someone/pushed" in capsys.readouterr().err
    assert api.calls[0][:2] == ("create_repo", "someone/pushed") and "README.md" in api.calls[1][2]
    assert "--push-to-hub someone/pushed" in (out / "README.md").read_text()  # the command that made it
