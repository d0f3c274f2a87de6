"""The catalogue of user mistakes (docs/reliability.md): each is one line on stderr saying what is
wrong and how to fix it, exit code 2, no traceback, and no output directory left half-written."""

import json
import pickle

import pytest

from dkdm.cli import main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    teacher = root / "teacher"
    assert main(["train", "--data", "toy2d", "--model", "mlp:width=16,depth=1", "--diffusion-steps", "20",
                 "--steps", "20", "--no-progress", "--no-report", "--out", str(teacher)]) == 0
    run = root / "run"
    assert main(["distill", "--teacher", str(teacher), "--student", "mlp:width=8,depth=1", "--batch", "8",
                 "--rho", "0.5", "--steps", "10", "--ckpt-every", "5", "--no-progress", "--no-report",
                 "--out", str(run)]) == 0
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "dkdm_model.json").write_text((teacher / "dkdm_model.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    notmodel = root / "notmodel"
    notmodel.mkdir()
    (notmodel / "readme.txt").write_text("hi")
    evil = root / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": print}))
    badyaml = root / "bad.yaml"
    badyaml.write_text("steps: [1,\n")
    typo = root / "typo.yaml"
    typo.write_text("stpes: 3\n")
    notes = root / "notes.txt"
    notes.write_text("my notes\n")
    return {"T": str(teacher), "RUN": str(run), "CORRUPT": str(corrupt), "NOTMODEL": str(notmodel),
            "EVIL": str(evil), "BADYAML": str(badyaml), "TYPO": str(typo), "NOTES": str(notes), "ROOT": str(root)}


D = ["distill", "--teacher", "T", "--student", "mlp:width=8,depth=1", "--batch", "8", "--rho", "0.5", "--steps", "4",
     "--no-progress", "--no-report"]
CASES = [
    ("unknown data set", ["train", "--data", "mnist", "--out", "NEW"], "neither a built-in data set"),
    ("spec syntax", ["train", "--model", "mlp:width", "--out", "NEW"], "expected key=value"),
    ("spec field", ["train", "--model", "unet:widths=32-x", "--out", "NEW"], "must be a list of integers"),
    ("learning rate", ["train", "--lr", "-1", "--out", "NEW"], "--lr must be > 0"),
    ("objective weights", ["train", "--simple-weight", "0", "--vlb-weight", "0", "--out", "NEW"], "not both 0"),
    ("steps", ["train", "--steps", "0", "--out", "NEW"], "--steps must be at least 1"),
    ("ema", ["train", "--ema", "1.5", "--out", "NEW"], "--ema must be in [0, 1)"),
    ("teacher missing", [*D, "--teacher", "ROOT/nope", "--out", "NEW"], "does not exist"),
    ("teacher not a model", [*D, "--teacher", "NOTMODEL", "--out", "NEW"], "not a dkdm model directory"),
    ("teacher weights corrupt", [*D, "--teacher", "CORRUPT", "--out", "NEW"], "corrupt or not safetensors"),
    ("ADM flags unreadable", [*D, "--teacher", "EVIL", "--teacher-config", "BADYAML", "--out", "NEW"],
     "cannot read ADM config"),
    ("pool too small", [*D, "--rho", "0.001", "--out", "NEW"], "use --rho >="),
    ("preparation batch", [*D, "--prep-batch", "0", "--out", "NEW"], "--prep-batch must be at least 1"),
    ("student does not fit the data", [*D, "--student", "unet:widths=8-16", "--out", "NEW"], "square images"),
    ("student steps not a respacing", [*D, "--student-steps", "50", "--out", "NEW"], "cannot respace 20 steps to 50"),
    ("guidance without classes", [*D, "--guidance", "3", "--out", "NEW"], "guidance needs a class-conditional"),
    ("out holds a run", [*D, "--out", "RUN"], "already holds a run; pass --resume"),
    ("resume with nothing", [*D, "--resume", "--out", "NEW"], "no checkpoint to resume from"),
    ("resume with changed config", [*D, "--student", "mlp:width=12,depth=1", "--steps", "20", "--resume",
                                    "--out", "RUN"], "settings differ from the run"),
    ("bad YAML config", [*D, "--config", "BADYAML", "--out", "NEW"], "cannot read config"),
    ("sample format", ["sample", "--model", "T", "--out", "NEW.txt"], "write samples as .npz"),
    ("evaluate steps", ["evaluate", "--model", "T", "--steps", "1"], "--steps must be in 2..20"),
    ("synth into a run", ["synth", "--teacher", "T", "--num", "4", "--steps", "2", "--out", "RUN"], "already exists"),
    ("data-limited without samples", ["train", "--data", "digits", "--real-fraction", "10", "--out", "NEW"],
     "go together"),
    ("convert a pickle", ["convert", "--checkpoint", "EVIL", "--config", "ROOT/flags.json", "--out", "NEW"],
     "never unpickles"),
    # issue 18: the command line as a new user meets it
    ("misspelled flag", [*D, "--stpes", "10", "--out", "NEW"], "--stpes: did you mean --steps?"),
    ("flag of another command", ["sample", "--model", "T", "--teacher", "T", "--out", "NEW.txt"],
     "--teacher: no such flag"),
    ("misspelled command", ["distil", "--out", "NEW"], "did you mean distill?"),
    ("not a number", [*D, "--batch", "many", "--out", "NEW"], "invalid int value: 'many'"),
    ("not a choice", [*D, "--pool", "big", "--out", "NEW"], "invalid choice: 'big'"),
    ("misspelled setting in a config", [*D, "--config", "TYPO", "--out", "NEW"], "unknown setting(s) stpes"),
    ("pool larger than memory", [*D, "--batch", "100000000000", "--out", "NEW"], "GiB free: a smaller --batch"),
    ("batch zero", [*D, "--batch", "0", "--out", "NEW"], "--batch must be at least 1"),
    ("out holds other files", [*D, "--out", "NOTMODEL"], "holds no dkdm run; choose a new or empty directory"),
    ("resume other files", [*D, "--resume", "--out", "NOTMODEL"], "holds no dkdm run (no run.json"),
    ("resume with a changed lr", ["distill", "--out", "RUN", "--resume", "--lr", "0.5"], "--lr 0.5 (saved"),
    ("resume with the other command", ["train", "--out", "RUN", "--resume"], "is a `dkdm distill` run"),
    ("sample a file", ["sample", "--model", "NOTES", "--out", "ROOT/never.npz"], "is a file, not a model directory"),
    ("unknown student type", [*D, "--student", "resnet", "--out", "NEW"], "unknown model type 'resnet'; choose one"),
    ("fp16 on a CPU", [*D, "--mixed-precision", "fp16", "--out", "NEW"], "fp16 needs a CUDA device"),
    ("max-steps without auto", [*D, "--max-steps", "5", "--out", "NEW"], "goes with --steps auto"),
    ("steps auto without a teacher", ["train", "--steps", "auto", "--out", "NEW"], "needs a teacher"),
    ("negative preparation checkpoints", [*D, "--prep-ckpt-every", "-1", "--out", "NEW"], "must be >= 0 seconds"),
    ("fewstep without a student", ["fewstep", "--teacher", "T", "--sampler-steps", "2", "--no-progress", "--out", "NEW"],
     "--student is required"),
    ("report of a directory that holds no run", ["report", "NOTMODEL"], "is not a run directory"),
    ("push to a malformed repo id", ["push", "RUN", "not-a-repo"], "must look like USER/NAME"),
]


@pytest.mark.parametrize("name, args, message", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_clear_line_and_exit_2(env, tmp_path, capsys, name, args, message):
    import torch

    if name == "fp16 on a CPU" and torch.cuda.is_available():
        pytest.skip("fp16 is refused on a CPU only")
    if name == "convert a pickle":
        (tmp_path / "flags.json").write_text(json.dumps({"image_size": 32, "num_channels": 32, "num_res_blocks": 1,
                                                         "num_head_channels": 16}))
        env = {**env, "ROOT": str(tmp_path)}
    new = tmp_path / "new_out"
    subst = {**env, "NEW": str(new), "NEW.txt": str(tmp_path / "s.txt")}
    argv = []
    for a in args:
        a = subst.get(a, a)
        for k in ("ROOT",):
            a = a.replace(k + "/", subst[k] + "/") if a.startswith(k + "/") else a
        argv.append(a)
    run = json.loads(open(f"{env['RUN']}/run.json").read())
    capsys.readouterr()
    assert main(argv) == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    from dkdm.cli import COMMANDS

    prefix = f"dkdm {argv[0]}: error:" if argv[0] in COMMANDS else "dkdm: error:"
    errors = [line for line in err if line.startswith(prefix)]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert message in errors[0], errors[0]
    assert "Traceback" not in "\n".join(err)
    assert not new.exists() and not (tmp_path / "s.txt").exists()  # nothing half-written
    assert json.loads(open(f"{env['RUN']}/run.json").read()) == run  # an existing run is untouched


def test_the_catalogue_reaches_every_command_that_takes_user_input():
    """Every command is refused somewhere in the catalogue, so a command whose input checks broke
    would show here; and no two cases are the same mistake."""
    from dkdm.cli import COMMANDS

    refused = {argv[0] for _, argv, _ in CASES if argv and argv[0] in COMMANDS}
    assert refused == set(COMMANDS), f"no bad-input case for {sorted(set(COMMANDS) - refused)}"
    assert len({tuple(argv) for _, argv, _ in CASES}) == len(CASES)
