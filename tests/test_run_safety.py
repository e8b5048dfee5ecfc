"""Runs a researcher can trust: --resume refuses another recipe (and another script's run), a signal stops a run after
a whole step with state.pt written and a line saying how to continue, log.jsonl holds each step once with a time
stamp, args.json records each run, and the usual mistakes end in one line. Tiny CLIP on CPU; tar shards and CSVs
from tests/_image_text_fixtures.py, NIGHTS from tests/nights_fixture.py."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

import _image_text_fixtures as fx
import data
import finetune_qkv
import model
import train_clip
import train_nights
from model import CLIP, CLIPConfig, CheckpointError, DiskFullError, Preempted, RecipeError, load_checkpoint
from nights_fixture import make_nights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1")
NIGHTS_TINY = ["--model", "tiny", "--workers", "0", "--batch-size", "16", "--lr", "1e-3", "--warmup-epochs", "0.5",
               "--epochs", "2", "--subset", "0.5", "--no-augment"]  # 3 steps per epoch on the fixture below


@pytest.fixture
def csv_run(tmp_path):
    """train_clip.py on a 16-row CSV: --batch-size 8 gives 2 steps per epoch."""
    return fx.csv_run_args(tmp_path) + ["--batch-size", "8", "--epochs", "2"]


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nights"))
    make_nights(root, {"train": 96, "val": 16, "test": 4})
    return root


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_lines(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


# --- 1. --resume checks the recipe --------------------------------------------------------------------------------


def test_resume_refuses_another_recipe_naming_each_flag(csv_run, tmp_path):
    out = str(tmp_path / "run")
    train_clip.main(csv_run + ["--out", out, "--stop-after-steps", "1"])
    changed = [a for a in csv_run]
    changed[changed.index("--batch-size") + 1], changed[changed.index("--epochs") + 1] = "4", "3"
    changed[changed.index("--lr") + 1] = "1e-2"
    with pytest.raises(RecipeError) as err:
        train_clip.main(changed + ["--out", out, "--resume", "--no-augment"])
    message = str(err.value)
    for expected in ("--epochs 2 (this command: 3)", "--batch-size 8 (this command: 4)",
                     "--lr 0.002 (this command: 0.01)", "--no-augment off (this command: on)"):
        assert expected in message
    assert "\n" not in message and "--workers" not in message
    # another --model: named before any weight is loaded (no list of missing keys)
    with pytest.raises(RecipeError, match=r"own values: --model tiny \(this command: ViT-B-32\); or"):
        train_clip.main(csv_run + ["--out", out, "--resume", "--model", "ViT-B-32"])
    with pytest.raises(RecipeError, match=r"--init unset \(this command: .*x\.pt\)"):
        train_clip.main(csv_run + ["--out", out, "--resume", "--init", str(tmp_path / "x.pt")])
    assert load_checkpoint(os.path.join(out, "state.pt"))["step"] == 1  # the refusals changed nothing


def test_resume_accepts_run_settings_and_ends_as_an_unbroken_run(csv_run, tmp_path):
    full, out = str(tmp_path / "full"), str(tmp_path / "parts")
    train_clip.main(csv_run + ["--out", full])
    train_clip.main(csv_run + ["--out", out, "--stop-after-steps", "1"])
    settings = ["--workers", "1", "--log-every", "2", "--save-every-steps", "3", "--dist-timeout", "5"]
    train_clip.main(csv_run + settings + ["--out", out, "--resume"])
    for name in ("epoch_1.pt", "epoch_2.pt"):
        assert same_weights(load_checkpoint(os.path.join(full, name)), load_checkpoint(os.path.join(out, name)))
    assert json.load(open(os.path.join(out, "args.json")))["args"]["workers"] == 1  # the record follows the resume


def test_help_lists_what_may_change_on_resume():
    for parser in (train_clip.get_parser(), train_nights.get_parser(), finetune_qkv.get_parser()):
        text = " ".join(parser.format_help().split())
        assert "--workers, --save-every-steps, --stop-after-steps, --dist-timeout" in text
        assert "longer than the run is kept, with a warning" in text  # item 5: what a long warm-up does


def test_train_nights_and_finetune_check_the_recipe_and_the_script(nights, tmp_path):
    out = str(tmp_path / "stage1")
    assert train_nights.main(NIGHTS_TINY + ["--data", nights, "--out", out, "--stop-after-steps", "2"]) is None
    other = NIGHTS_TINY + ["--data", nights, "--out", out, "--resume"]
    other[other.index("--subset") + 1] = "1.0"
    with pytest.raises(RecipeError, match=r"--subset 0\.5 \(this command: 1\.0\)"):
        train_nights.main(other)
    with pytest.raises(RecipeError, match=r"--schedule cosine \(this command: constant\)"):
        train_nights.main(NIGHTS_TINY + ["--data", nights, "--out", out, "--resume", "--schedule", "constant"])
    # finetune_qkv.py pointed at a stage-1 run: named as such, with or without --resume
    base = str(tmp_path / "base.pt")
    torch.save(CLIP(CLIPConfig.tiny()).state_dict(), base)
    ft = ["--checkpoint", base, "--model", "tiny", "--data", nights, "--out", out, "--workers", "0", "--epochs", "1"]
    with pytest.raises(FileExistsError, match=r"state\.pt exists, from a train_nights\.py run: choose another --out"):
        finetune_qkv.main(ft)
    with pytest.raises(CheckpointError, match=r"training state of a train_nights\.py run, not of finetune_qkv\.py"):
        finetune_qkv.main(ft + ["--resume"])


def test_a_state_written_by_another_script_is_named(csv_run, tmp_path, nights):
    out = str(tmp_path / "stage2")
    train_clip.main(csv_run + ["--out", out, "--stop-after-steps", "0"])
    with pytest.raises(CheckpointError, match=r"a train_clip\.py run, not of train_nights\.py"):
        train_nights.main(NIGHTS_TINY + ["--data", nights, "--out", out, "--resume"])
    # a state written before states named their script: told by the flags only that script has
    assert model.written_by({"args": {"merges": "m.gz"}}) == "train_clip.py"
    assert model.written_by({"args": {"checkpoint": "c.pt", "subset": 1.0}}) == "finetune_qkv.py"


# --- 2. stopping on a signal ---------------------------------------------------------------------------------------


def test_ctrl_c_finishes_the_step_writes_state_and_resumes_exactly(csv_run, tmp_path, monkeypatch, capsys):
    full, out = str(tmp_path / "full"), str(tmp_path / "cut")
    train_clip.main(csv_run + ["--out", full])
    real_step, handler = train_clip.optimizer_step, signal.getsignal(signal.SIGINT)

    def ctrl_c_in_step_2(*a, **kw):
        if kw["progress"].step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here; the step still completes
        return real_step(*a, **kw)

    monkeypatch.setattr(train_clip, "optimizer_step", ctrl_c_in_step_2)
    with pytest.raises(Preempted, match="stopped at step 2 on SIGINT"):
        train_clip.main(csv_run + ["--out", out])
    printed = capsys.readouterr().out
    assert re.search(r"stopped at step 2 of 4 \(on SIGINT, resumable\); .*state\.pt written; continue with: "
                     r"python train_clip\.py .*--resume$", printed, re.M)
    assert load_checkpoint(os.path.join(out, "state.pt"))["step"] == 2
    assert os.path.isfile(os.path.join(out, "epoch_1.pt"))  # step 2 ended epoch 1: its end ran before the stop
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the run
    monkeypatch.setattr(train_clip, "optimizer_step", real_step)
    train_clip.main(csv_run + ["--out", out, "--resume"])
    assert same_weights(*(load_checkpoint(os.path.join(run, "epoch_2.pt")) for run in (full, out)))


def test_a_second_ctrl_c_stops_at_once(csv_run, tmp_path, monkeypatch):
    real_step = train_clip.optimizer_step

    def two_ctrl_c(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **kw)

    monkeypatch.setattr(train_clip, "optimizer_step", two_ctrl_c)
    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train_clip.main(csv_run + ["--out", out])
    assert not os.path.exists(os.path.join(out, "state.pt"))


def test_train_nights_stops_on_sigusr1_and_resumes_exactly(nights, tmp_path, monkeypatch):
    args = NIGHTS_TINY + ["--data", nights]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train_nights.main(args + ["--out", whole])
    real_step, calls = train_nights.hinge_step, []

    def sigusr1_in_step_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal
        return real_step(*a, **kw)

    monkeypatch.setattr(train_nights, "hinge_step", sigusr1_in_step_2)
    with pytest.raises(Preempted, match="stopped at step 2 on SIGUSR1"):
        train_nights.main(args + ["--out", cut])
    monkeypatch.setattr(train_nights, "hinge_step", real_step)
    assert load_checkpoint(os.path.join(cut, "state.pt"))["step"] == 2
    train_nights.main(args + ["--out", cut, "--resume"])
    assert same_weights(*(load_checkpoint(os.path.join(run, "nights.pt")) for run in (whole, cut)))
    # the log: epoch 0 (init), 1, 2 once each, time-stamped, 2AFC in percent as evaluate.py
    log = log_lines(cut)
    assert [r["epoch"] for r in log] == [0, 1, 2] and all("time" in r for r in log)
    assert all(0 <= r["val_2afc"] <= 100 for r in log) and any(r["val_2afc"] > 1 for r in log)


def test_resume_command():
    model._command["argv"] = ["--data", "x.csv", "--stop-after-steps", "3", "--out", "o b"]
    try:
        assert model.resume_command("train_clip.py") == "python train_clip.py --data x.csv --out 'o b' --resume"
        model._command["argv"] = ["--stop-after-steps=3", "--resume", "--out", "o"]
        env = dict(WORLD_SIZE="4", LOCAL_WORLD_SIZE="4")
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert model.resume_command("t.py") == "torchrun --standalone --nproc_per_node 4 t.py --resume --out o"
            mp.setenv("WORLD_SIZE", "8")
            assert model.resume_command("t.py").startswith("torchrun <this job's options> t.py")
    finally:
        model._command["argv"] = None


def slow_run(script, args, seconds=0.3):
    """The script as a process whose steps take at least `seconds` (tests/_slow_train.py)."""
    cmd = [sys.executable, os.path.join(ROOT, "tests", "_slow_train.py"), script, str(seconds)] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out, step, proc, timeout=120):
    """Until log.jsonl shows step `step` (the run is well inside its loop)."""
    path, t0 = os.path.join(out, "log.jsonl"), time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(path) and any(json.loads(x).get("step", 0) >= step for x in open(path) if x.endswith("\n")):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {path}")


def run(cmd, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def tar_run(tmp_path):
    """Tar shards read by 2 workers: 2 epochs of 8 steps of 4 samples."""
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=2, per_shard=16)
    merges, _ = fx.learned_tokenizer(tmp_path)
    return ["--model", "tiny", "--data", pattern, "--merges", merges, "--batch-size", "4", "--epochs", "2",
            "--lr", "2e-3", "--warmup-steps", "2", "--workers", "2", "--shuffle-buffer", "4", "--seed", "1"]


@pytest.mark.filterwarnings("ignore:.*unexpected end of data")
def test_sigterm_mid_epoch_saves_the_step_reached_and_resumes_bit_identical(tar_run, tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run([sys.executable, "train_clip.py", *tar_run, "--out", full])
    proc = slow_run("train_clip.py", tar_run + ["--out", cut])
    wait_for_step(cut, 2, proc)
    proc.send_signal(signal.SIGTERM)  # what SLURM and Kubernetes send before they kill a job
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == model.PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    step = load_checkpoint(os.path.join(cut, "state.pt"))["step"]
    logged = [r["step"] for r in log_lines(cut) if "loss" in r]
    assert 2 <= step < 8 and logged == list(range(1, step + 1))  # mid-epoch 1, and no finished step lost
    line = stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"stopped at step {step} of 16 \(on SIGTERM, resumable\); \S+state\.pt written; "
                        r"continue with: python train_clip\.py .* --resume", line), line
    resume = shlex.split(line.split("continue with: ")[1])
    run([sys.executable] + resume[1:])  # the printed command itself
    for name in ("epoch_1.pt", "epoch_2.pt"):
        assert same_weights(load_checkpoint(os.path.join(full, name)), load_checkpoint(os.path.join(cut, name)))


@pytest.mark.filterwarnings("ignore:.*unexpected end of data")
def test_ctrl_c_to_the_whole_process_group_stops_cleanly(tar_run, tmp_path):
    """A terminal sends Ctrl-C to every process of the job, DataLoader workers included: they go on reading, the
    main process finishes its step, writes state.pt and exits with one line, no traceback."""
    out = str(tmp_path / "ctrl_c")
    cmd = [sys.executable, os.path.join(ROOT, "tests", "_slow_train.py"), "train_clip.py", "0.3"] + tar_run
    proc = subprocess.Popen(cmd + ["--out", out], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own process group, as a terminal job
    wait_for_step(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == model.PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    step = load_checkpoint(os.path.join(out, "state.pt"))["step"]
    assert step == max(r["step"] for r in log_lines(out))
    assert re.search(rf"^stopped at step {step} of 16 \(on SIGINT, resumable\)", stdout, re.M)
    assert stderr.count("SIGINT: stopping after this step") == 1  # the main process's word, not every worker's


def rank_pid(torchrun_pid, rank, timeout=60):
    """The pid of a torchrun worker, found by the RANK in its environment."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        children = open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read().split()
        for pid in children:
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise TimeoutError(f"no rank {rank} under {torchrun_pid}")


@pytest.mark.filterwarnings("ignore:.*unexpected end of data")
def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(tar_run, tmp_path):
    from test_clip_training import free_port
    out = str(tmp_path / "ddp")
    args = tar_run + ["--workers", "0", "--out", out]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.Popen(launch + [os.path.join(ROOT, "tests", "_slow_train.py"), "train_clip.py", "0.3"] + args,
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 2, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns of it through the all-reduce
    stdout, stderr = proc.communicate(timeout=120)
    step = load_checkpoint(os.path.join(out, "state.pt"))["step"]
    assert 2 <= step < 16
    assert f"stopped at step {step} of 16 (on a signal to another rank, resumable)" in stdout
    codes = re.findall(r"exitcode +: (-?\d+) \(pid", stderr)  # torchrun's report on the ranks
    assert codes and set(codes) == {str(model.PREEMPTED)}, stderr[-3000:]
    resumed = run(launch[:-1] + [str(free_port()), "train_clip.py"] + args + ["--resume"])
    assert f"resumed from {out}/state.pt at step {step}" in resumed.stdout
    assert load_checkpoint(os.path.join(out, "state.pt"))["step"] == 16


# --- 3. log.jsonl --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*unexpected end of data")
def test_kill_9_then_resume_logs_each_step_exactly_once(tar_run, tmp_path):
    out = str(tmp_path / "killed")
    args = tar_run + ["--out", out, "--save-every-steps", "2"]
    proc = slow_run("train_clip.py", args)
    wait_for_step(out, 3, proc)
    proc.kill()
    proc.communicate()
    saved = load_checkpoint(os.path.join(out, "state.pt"))["step"]
    assert saved < max(r["step"] for r in log_lines(out))  # the killed run logged steps its state.pt does not hold
    run([sys.executable, "train_clip.py"] + args + ["--resume"])
    log = log_lines(out)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert [r["epoch"] for r in steps] == [1] * 8 + [2] * 8  # 1-based, as the epoch lines and epoch_<n>.pt
    assert [r["epoch"] for r in log if "loss" not in r] == [1, 2]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", r["time"]) for r in log)


def test_logger_drops_the_lines_after_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"note": "no step"}\n{"step": 2, "epoch": 1}\n{"step": 3}\n{"step": 4, "lo')
    logger = model.JsonlLogger(str(path), resume=True, step=2)
    logger.log(step=3)
    lines = [json.loads(x) for x in open(path)]
    assert [r.get("step") for r in lines] == [1, None, 2, 3] and "time" in lines[-1]
    model.JsonlLogger(str(path), resume=False)  # a fresh run starts a new file
    assert path.read_text() == ""


# --- 4. args.json and the lines a run prints; 5. the warm-up warning -------------------------------------------------


def test_args_json_and_the_lines_a_run_prints(csv_run, tmp_path, capsys):
    _, tok = fx.learned_tokenizer(tmp_path)
    init = str(tmp_path / "nights.pt")
    torch.save(CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size)).state_dict(), init)
    out = str(tmp_path / "pi")
    train_clip.main(csv_run + ["--out", out, "--init", init, "--stop-after-steps", "3", "--warmup-steps", "100"])
    n_visual = len(CLIP(CLIPConfig.tiny()).visual.state_dict())
    printed = capsys.readouterr()
    assert f"--init loaded {n_visual} tensors (visual.*) from {init}" in printed.out
    assert f"epoch 1: wrote {out}/epoch_1.pt" in printed.out
    assert "stopped at step 3 of 4 (planned, resumable)" in printed.out
    assert "warning: the warm-up (--warmup-steps) is 100 steps, longer than the run's 4" in printed.err
    record = json.load(open(os.path.join(out, "args.json")))
    assert record["script"] == "train_clip.py" and record["args"]["init"] == init
    assert record["args"]["precision"] == "fp32"  # the resolved default, not None
    assert record["loaded"] == {"--init": {"path": init, "tensors": n_visual}}
    assert os.path.isfile(os.path.join(out, "config.json"))
    train_clip.main(csv_run + ["--out", out, "--init", init, "--resume", "--warmup-steps", "100"])
    assert f"resumed from {out}/state.pt at step 3" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "args.json")))["loaded"] == record["loaded"]  # kept across the resume


def test_args_json_of_stage_1_and_fine_tuning(nights, tmp_path, capsys):
    out = str(tmp_path / "s1")
    train_nights.main(NIGHTS_TINY + ["--data", nights, "--out", out, "--epochs", "1", "--warmup-epochs", "2"])
    assert "warning: the warm-up (--warmup-epochs 2.0) is 6 steps, longer than the run's 3" in capsys.readouterr().err
    record = json.load(open(os.path.join(out, "args.json")))
    assert record["script"] == "train_nights.py" and record["loaded"] == {} and record["args"]["subset"] == 0.5
    ft = str(tmp_path / "ft")
    base = os.path.join(out, "nights.pt")
    finetune_qkv.main(["--checkpoint", base, "--data", nights, "--out", ft, "--workers", "0", "--epochs", "1",
                       "--subset", "0.5"])
    record = json.load(open(os.path.join(ft, "args.json")))
    assert record["script"] == "finetune_qkv.py" and record["loaded"]["--checkpoint"]["path"] == base
    assert record["loaded"]["--checkpoint"]["tensors"] == len(load_checkpoint(base))


# --- 6. one-line errors ------------------------------------------------------------------------------------------


def test_shell_patterns_and_folders_name_their_shards(tmp_path):
    fx.plain_shards(tmp_path / "s", n_shards=3, per_shard=1)
    (tmp_path / "s" / "notes.txt").write_text("not a shard")
    names = [str(tmp_path / "s" / f"{n:05d}.tar") for n in range(3)]
    assert data.expand_shards(str(tmp_path / "s" / "*.tar")) == names
    assert data.expand_shards(str(tmp_path / "s") + "/") == names == data.expand_shards(str(tmp_path / "s"))
    assert data.expand_shards(str(tmp_path / "{s,s}" / "0000[12].tar")) == names[1:] * 2
    with pytest.raises(FileNotFoundError, match=r"no \.tar file is named by .*\*\.tgz'; shards can be named as "
                                                r"'dir/\{00000\.\.00099\}\.tar', 'dir/\*\.tar' or 'dir/'"):
        data.expand_shards(str(tmp_path / "s" / "*.tgz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.tar file is named by .*empty'"):
        data.expand_shards(str(tmp_path / "empty"))
    odd = tmp_path / "odd[1].tar"  # an existing file whose name looks like a pattern is itself
    odd.write_bytes(b"")
    assert data.expand_shards(str(odd)) == [str(odd)]
    assert data.expand_shards("not/there/{0..1}.tar") == ["not/there/0.tar", "not/there/1.tar"]  # reported later


def test_checkpoint_without_config_json_reads_its_vocabulary_and_names_the_fix(tmp_path):
    weights = CLIP(CLIPConfig.tiny(vocab_size=622)).state_dict()
    path = str(tmp_path / "copied" / "epoch_3.pt")
    os.makedirs(os.path.dirname(path))
    torch.save(weights, path)  # no config.json beside it
    cfg = model.config_for(path, preset="tiny")
    assert cfg.vocab_size == 622 and cfg.context_length == CLIPConfig.tiny().context_length
    model.load_state_dict_checked(CLIP(cfg), path)  # loads: the vocabulary came from the checkpoint
    assert model.config_for(path).vocab_size == 622  # no --model: ViT-B-32, with the checkpoint's vocabulary
    wide = str(tmp_path / "wide.pt")  # weights of another architecture, read as --model tiny
    torch.save(CLIP(CLIPConfig.tiny(vision_width=96, vocab_size=622)).state_dict(), wide)
    hint = model.architecture_hint(wide, preset="tiny")
    assert "pass --config <the run's config.json>, or the --model it was trained as" in hint
    with pytest.raises(CheckpointError, match=r"does not match the model \(CLIP\); no config\.json beside .*wide\.pt, "
                                              r"so it was read as --model tiny \(with its own vocabulary\)"):
        model.load_state_dict_checked(CLIP(model.config_for(wide, preset="tiny")), wide, hint=hint)
    with open(os.path.join(os.path.dirname(path), "config.json"), "w") as f:
        json.dump({"model": "tiny", "vocab_size": 622}, f)
    assert model.architecture_hint(path) == ""  # with its config.json it is exact


def test_disk_full_names_the_folder_and_keeps_the_old_state(tmp_path, monkeypatch):
    path = str(tmp_path / "state.pt")
    model.save_checkpoint({"step": 1}, path)

    def onto_a_full_disk(dir, prefix, suffix):  # a temp file whose writes fail with ENOSPC, as on a full disk
        return os.open("/dev/full", os.O_WRONLY), os.path.join(dir, prefix + "x" + suffix)

    monkeypatch.setattr(model.tempfile, "mkstemp", onto_a_full_disk)
    monkeypatch.setattr(model.os, "chmod", lambda *a: None)  # /dev/full's mode is not ours to change
    with pytest.raises(DiskFullError) as err:
        model.save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, path)
    assert str(err.value) == f"no space left on device at {tmp_path}; the previous state.pt is intact"
    assert load_checkpoint(path)["step"] == 1


def test_run_main_prints_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_clip.py"])

    def fails():
        raise RecipeError("runs/x/state.pt was trained with another recipe")

    with pytest.raises(SystemExit) as exit_:
        model.run_main(fails)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "train_clip.py: error: runs/x/state.pt was trained with another recipe\n"

    def preempted():
        raise Preempted("stopped at step 3 on SIGTERM")

    with pytest.raises(SystemExit) as exit_:
        model.run_main(preempted)
    assert exit_.value.code == model.PREEMPTED
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # as the process leaves (conftest restores it)
    monkeypatch.setenv("TRACEBACK", "1")
    with pytest.raises(RecipeError):
        model.run_main(fails)


def test_usual_mistakes_end_in_one_line_without_a_traceback(csv_run, tmp_path):
    out = str(tmp_path / "run")
    train_clip.main(csv_run + ["--out", out, "--stop-after-steps", "0"])
    cases = {"another recipe": (csv_run + ["--out", out, "--resume", "--lr", "1"],
                                r"--lr 0\.002 \(this command: 1\.0\)"),
             "no --resume": (csv_run + ["--out", out], r"state\.pt exists: pass --resume"),
             "missing shards": (csv_run + ["--out", out + "2", "--data", str(tmp_path / "none" / "*.tar")],
                                r"no \.tar file is named by .*none/\*\.tar")}
    for name, (args, pattern) in cases.items():
        proc = subprocess.run([sys.executable, "train_clip.py"] + args, cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (name, proc.stderr[-3000:])
        assert re.match(r"train_clip\.py: error: ", lines[0]) and re.search(pattern, lines[0]), (name, lines)


# --- 7. CSV paths ------------------------------------------------------------------------------------------------


def write_image(path, i=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(fx.image_bytes(i))


def write_rows(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("filepath,title\n" + "".join(f"{p},{c}\n" for p, c in rows))


def test_csv_paths_resolve_as_open_clip_then_from_the_csv_folder(tmp_path, monkeypatch):
    _, tok = fx.learned_tokenizer(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_image(str(tmp_path / "images" / "a.jpg"), 1)  # relative to the working directory (open_clip)
    write_image(str(tmp_path / "lists" / "images" / "a.jpg"), 2)  # the same name beside the CSV
    write_image(str(tmp_path / "lists" / "images" / "b.jpg"), 3)  # only beside the CSV
    write_rows(str(tmp_path / "lists" / "pairs.csv"), [("images/a.jpg", "a red cat"), ("images/b.jpg", "a dog"),
                                                        (str(tmp_path / "images" / "a.jpg"), "an absolute path")])
    ds = data.CsvRows("lists/pairs.csv")
    assert ds.path(0) == str(tmp_path / "images" / "a.jpg")  # the working directory wins, as in open_clip
    assert ds.path(1) == str(tmp_path / "lists" / "images" / "b.jpg")  # the documented fallback
    assert ds.path(2) == str(tmp_path / "images" / "a.jpg")
    monkeypatch.chdir("/")  # DataLoader workers and later reads keep the working directory of the start
    assert ds.path(0) == str(tmp_path / "images" / "a.jpg")


def test_csv_missing_file_is_no_image_and_corrupt_is_undecodable(tmp_path):
    """Rows whose image is missing or corrupt are counted skips, replaced by their stream's next row; a CSV with no
    usable row is an error after one pass, naming a row, not a hang."""
    _, tok = fx.learned_tokenizer(tmp_path)
    root = tmp_path / "d"
    write_image(str(root / "ok.jpg"))
    (root / "corrupt.jpg").write_bytes(fx.image_bytes(5)[:60])
    write_rows(str(root / "pairs.csv"), [("ok.jpg", "a cat"), ("gone.jpg", "a dog"), ("corrupt.jpg", "a cow")])
    loader = data.image_text_loader(str(root / "pairs.csv"), tok, 32, 1, workers=0)
    batches = list(loader.batches())
    texts = [tok.decode([t for t in b["tokens"][0].tolist() if t not in (0, tok.sot_token, tok.eot_token)])
             for b in batches]
    assert [t.strip() for t in texts] == ["a cat"] * 3
    bad = sum((Counter(b["bad"]) for b in batches), Counter())
    assert bad[data.NO_IMAGE] >= 1 and bad[data.UNDECODABLE] >= 1 and bad[data.REREAD] == 2  # ok.jpg three times
    write_rows(str(root / "none.csv"), [("corrupt.jpg", "a cow"), ("gone.jpg", "a dog")])
    with pytest.raises(ValueError, match=r"no usable sample \(.*'no image': \d+.*\): e\.g\. .*(gone|corrupt)\.jpg"):
        next(data.image_text_loader(str(root / "none.csv"), tok, 32, 1, workers=0).batches())


def test_csv_whose_paths_are_all_wrong_is_one_error_naming_both_places(tmp_path):
    _, tok = fx.learned_tokenizer(tmp_path)
    write_rows(str(tmp_path / "c" / "pairs.csv"), [(f"img/{i}.jpg", "a cat") for i in range(20)])
    with pytest.raises(FileNotFoundError, match=r"none of the first 16 images exists: 'img/0\.jpg' is neither at "
                                                r".*img/0\.jpg \(the working directory, as open_clip reads it\) nor "
                                                r"at .*c/img/0\.jpg \(the CSV's folder\)"):
        data.CsvRows(str(tmp_path / "c" / "pairs.csv"))
