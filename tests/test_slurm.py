"""The Slurm launcher against a real one-node Slurm cluster (scripts/local_slurm.sh): results equal a local run's, a
job stopped mid-run is requeued and resumes, requeues are bounded, --status and --no-wait, and one line for each bad
option before any job is submitted. The option parsing is also checked without a cluster."""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "local_slurm.sh"
TINY = ["--no-identity", "--preset", "smoke", "--budgets", "40", "--batch-size", "2", "--uratio", "1",
        "--eval-subset", "100",        "--eval-batch-size", "100", "--device", "cpu"]
ON_CLUSTER = ["--launcher", "slurm", "--partition", "cpu", "--allow-local-out"]  # pytest's folders are under /tmp


def run_all(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_all.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def popen_run_all(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_all.py", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


def queue() -> list[str]:
    """Every job id Slurm still knows (queued, running, or ended less than MinJobAge ago)."""
    return subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True,
                          check=True).stdout.split()


def job_state(job_id: str) -> tuple[str, int]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-O", "State:|,RestartCnt:|"],
                         capture_output=True, text=True).stdout.strip()
    state, _, restarts = out.partition("|")
    return state, int(restarts.strip("|") or 0)


def wait_for(what: str, check, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def last_step(run_dir: Path) -> int:
    from contract.results import latest_progress

    return latest_progress(run_dir).step


def launch_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "launch.json").read_text())


@pytest.fixture(scope="module")
def slurm_cluster():
    """The one-node cluster of scripts/local_slurm.sh, started for this module and stopped after it (left running if
    it was running before)."""
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm cluster needs root (packages, /etc/slurm, daemons)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm's packages (slurm-wlm, munge) are missing and there is no apt-get to install them")
    pytest.importorskip("submitit", reason="submitit is not installed: pip install -e '.[slurm]'")
    was_up = subprocess.run([SCRIPT, "status"], capture_output=True).returncode == 0
    started = subprocess.run([SCRIPT, "start"], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.skip(f"the local Slurm cluster did not start: {(started.stderr or started.stdout).strip()[-300:]}")
    yield
    if not was_up:
        subprocess.run([SCRIPT, "stop"], capture_output=True, timeout=300)


@pytest.fixture
def cluster(slurm_cluster):
    """The cluster, for one test: the jobs it submitted are cancelled after it, failed or not, so that none holds
    the node's CPUs while the next test waits for its own."""
    before = set(queue())
    yield
    leftover = sorted(set(queue()) - before)
    if leftover:
        subprocess.run(["scancel", *leftover], capture_output=True)


# --- the options, without a cluster --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("1-02:30:01", 1591),
    ("0", 0), ("infinite", None), ("UNLIMITED", None),
])
def test_time_limits_read_as_slurm_does(text, minutes):
    from harness.slurm_options import parse_time

    assert parse_time(text, "--time") == minutes


def test_bad_time_and_sbatch_options_are_refused():
    from harness.plan import UsageError
    from harness.slurm_options import parse_sbatch, parse_time

    for bad in ("abc", "1:2:3:4", "-5", "1h"):
        with pytest.raises(UsageError, match="not accepted; accepted: minutes, or D-HH:MM:SS"):
            parse_time(bad, "--time")
    assert parse_sbatch(["constraint=a100", "--exclusive", "mail_type=END"]) == {
        "constraint": "a100", "exclusive": True, "mail-type": "END"}
    with pytest.raises(UsageError, match="use --time"):
        parse_sbatch(["time=10"])
    with pytest.raises(UsageError, match="sets this option itself"):
        parse_sbatch(["signal=B:USR1@60"])
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_sbatch(["constraint="])


@pytest.mark.parametrize("device, gpus, want", [
    ("cpu", None, ("cpu", 0)), ("auto", None, ("cuda", 1)), ("auto", 0, ("cpu", 0)), ("cuda", None, ("cuda", 1)),
    ("cuda:0", 2, ("cuda", 2)), ("cpu", 1, ("cpu", 1)),
])
def test_job_device_is_decided_by_gpus_per_job(device, gpus, want):
    from harness.slurm_options import job_device

    assert job_device(device, gpus) == want


def test_local_storage_is_recognized():
    from harness.slurm_options import local_storage

    assert "under /tmp" in local_storage(Path("/tmp/x/y"))
    assert "under /dev/shm" in local_storage(Path("/dev/shm"))
    # a tmpfs mounted elsewhere than the usual folders, read from /proc/mounts by hand
    tmpfs = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
             if line.split()[2] == "tmpfs" and not line.split()[1].startswith(("/tmp", "/var/tmp", "/dev/shm"))]
    if tmpfs:
        assert local_storage(Path(tmpfs[0]) / "runs") == f"on a tmpfs filesystem ({tmpfs[0]}), which only this " \
                                                            f"machine sees"


def test_slurm_flags_need_the_slurm_launcher(tmp_path):
    for flag in (["--partition", "gpu"], ["--no-wait"], ["--max-requeues", "2"]):
        line = one_line_error(run_all(*flag, "--dry-run", "--out", tmp_path))
        assert line == f"error: {flag[0]} applies to Slurm jobs only; add --launcher slurm"


def test_result_carries_the_launch_record_and_status_reads_run_folders(make_run_dir, tmp_path):
    """Entry points know nothing of launchers: result.json copies RUN/launch.json. --status works without Slurm."""
    from conftest import run_module
    from contract.results import read_launch

    done = make_run_dir("own", seed=0)
    record = {"launcher": "slurm", "job_ids": ["7"], "jobs": {"7": {"requeues": 1}}, "max_requeues": 3}
    (done / "launch.json").write_text(json.dumps(record))
    finished = run_module("own_impl.train", done)
    assert finished.returncode == 0, finished.stderr
    result = json.loads((done / "result.json").read_text())
    assert {k: result[k] for k in record} == record
    half = make_run_dir("own", seed=1)  # two of its three steps logged, in 4 s of training: ETA 1 step * 2 s
    (half / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "train_seconds": 2.5}\n'
                                        '{"kind": "train", "step": 2, "train_seconds": 4.0}\n')
    fresh = make_run_dir("own", seed=2)
    assert read_launch(fresh) == {"launcher": "local"}

    status = run_all("--status", "--out", tmp_path)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.strip().splitlines()
    assert lines[0] == f"{done.name}  done: final top-1 {result['final_top1']:.2f}%, 3 steps (job 7)"
    assert lines[1].startswith(f"{half.name}  unfinished (local): step 2/3, ETA 0:00:02, last logged 0:00:")
    assert lines[1].endswith(" ago; the next call resumes it")
    assert lines[2] == f"{fresh.name}  not started"
    assert lines[3] == "3 runs: 1 done, 1 unfinished, 1 new"


# --- against the cluster -------------------------------------------------------------------------------------------

def test_slurm_runs_equal_local_runs_with_no_wait_and_status(cluster, shared_archive, cifar, tmp_path):
    out, local = tmp_path / "slurm", tmp_path / "local"
    common = [*TINY, "--steps", "8", "--eval-every", "4", "--data", shared_archive]
    slurm = [*common, *ON_CLUSTER, "--out", out, "--time", "10", "--mem", "4G", "--cpus-per-job", "1",
             "--sbatch", "nice=1"]
    first = run_all(*slurm, "--no-wait", "--max-jobs", "1")  # one job now, the other on the next call
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(": submitted") == 1 and "1 run not submitted (--max-jobs 1)" in first.stdout
    [own_dir] = (out / "runs").iterdir()  # the plan's first run
    own_job = launch_record(own_dir)["job_ids"]
    assert "-own-" in own_dir.name and len(own_job) == 1

    second = run_all(*slurm, "--no-wait")  # own's job is still queued or running: it is not submitted again
    assert second.returncode == 0, second.stdout + second.stderr
    runs = {"torchssl" if "-torchssl-" in d.name else "own": d for d in (out / "runs").iterdir()}
    assert f"job {own_job[0]}: " in second.stdout and "[already queued]" in second.stdout
    assert second.stdout.count(": submitted") == 1
    torchssl_job = launch_record(runs["torchssl"])["job_ids"]
    assert launch_record(runs["own"])["job_ids"] == own_job and len(torchssl_job) == 1
    assert {own_job[0], torchssl_job[0]} <= set(queue())

    status = run_all("--status", "--out", out)
    assert status.returncode == 0, status.stderr
    for impl, job in (("own", own_job[0]), ("torchssl", torchssl_job[0])):
        line = next(x for x in status.stdout.splitlines() if x.startswith(runs[impl].name))
        assert f"job {job}: " in line and any(w in line for w in ("pending", "running", "done")), line

    waited = run_all(*slurm)  # follows the two jobs to their end
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert waited.stdout.count("[already queued]") + waited.stdout.count("done already") == 2
    status = run_all("--status", "--out", out)
    assert status.stdout.strip().endswith("2 runs: 2 done"), status.stdout

    script = (runs["own"] / "slurm" / own_job[0] / f"{own_job[0]}_submission.sh").read_text()
    for line in ("--partition=cpu", "--time=10", "--requeue", "--mem=4G", "--cpus-per-task=1", "--nice=1",
                 "--signal=USR2@90", f"--job-name={runs['own'].name}", f"export PYTHONPATH={REPO}"):
        assert line in script, line
    assert "gpus" not in script

    done = run_all(*common, "--out", local, "--no-warmup")
    assert done.returncode == 0, done.stdout + done.stderr
    for impl, job in (("own", own_job), ("torchssl", torchssl_job)):
        on_slurm = json.loads((runs[impl] / "result.json").read_text())
        here = json.loads((local / "runs" / runs[impl].name / "result.json").read_text())
        assert on_slurm["launcher"] == "slurm" and on_slurm["job_ids"] == job
        assert on_slurm["jobs"][job[0]]["requeues"] == 0
        assert here["launcher"] == "local" and "job_ids" not in here
        for key in ("spec_hash", "split_sha256", "data_sha256", "steps", "param_count"):
            assert on_slurm[key] == here[key], key
        assert on_slurm["steps"] == 8
    own_evals = [json.loads((d / "result.json").read_text())["evals"] for d in (runs["own"], local / "runs" /
                                                                               runs["own"].name)]
    assert [e["step"] for e in own_evals[0]] == [4, 8]
    assert own_evals[0] == own_evals[1]  # the same numbers, on the same CPU


def test_stopped_job_is_requeued_resumes_and_requeues_are_bounded(cluster, shared_archive, cifar, tmp_path):
    out = tmp_path / "slurm"
    steps = 200  # at several steps/s: enough left at every stop that no job ends before its signal arrives
    args = [*TINY, *ON_CLUSTER, "--impls", "own", "--steps", str(steps), "--eval-every", str(steps), "--log-every", "1",
            "--checkpoint-every", "1000", "--data", shared_archive, "--out", out, "--max-requeues", "2"]
    submitted = run_all(*args, "--no-wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_dir = next((out / "runs").iterdir())
    job = launch_record(run_dir)["job_ids"][0]

    def stop_and_see_resume(signal_name: str, requeues: int) -> None:
        """Signal the job after a few steps; it must be requeued (same id) and resume past the stopped step."""
        before = last_step(run_dir)
        wait_for(f"step {before + 2}", lambda: last_step(run_dir) >= before + 2 and job_state(job)[0] == "RUNNING")
        subprocess.run(["scancel", f"--signal={signal_name}", job], check=True)
        wait_for(f"requeue {requeues}", lambda: job_state(job)[1] == requeues)
        stopped = last_step(run_dir)
        wait_for("the resumed run's next step", lambda: last_step(run_dir) > stopped)
        log = (run_dir / "process.log").read_text()
        assert f"resuming {run_dir.name} from" in log and f"at step {stopped} of {steps}" in log

    stop_and_see_resume("TERM", 1)  # what pre-emption and the time limit send: the entry point checkpoints, exits 143
    stop_and_see_resume("USR2", 2)  # submitit's warning before the time limit: checkpoint() stops the entry point
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # a third stop: the bound is reached
    wait_for("the job to fail", lambda: job_state(job)[0] == "FAILED")
    status = run_all("--status", "--out", out)
    assert f"job {job}: FAILED (ended FAILED) at step" in status.stdout, status.stdout
    assert "after 2 requeues, the most allowed (--max-requeues 2)" in status.stdout
    assert launch_record(run_dir)["jobs"][job]["requeues"] == 2

    again = run_all(*args, "--no-wait")  # a new job; a plain scancel ends it for good
    second = launch_record(run_dir)["job_ids"][-1]
    assert again.returncode == 0 and second != job, again.stdout + again.stderr
    steps_before = last_step(run_dir)
    wait_for("the second job's steps", lambda: last_step(run_dir) > steps_before + 1)
    subprocess.run(["scancel", second], check=True)
    wait_for("the second job to be cancelled", lambda: job_state(second)[0] == "CANCELLED")
    assert f"job {second}: cancelled (exit 143); not requeued" in (run_dir / "process.log").read_text()

    finished = run_all(*args)  # a third job resumes the run to its end
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result = json.loads((run_dir / "result.json").read_text())
    third = result["job_ids"][-1]
    assert result["steps"] == steps and result["job_ids"] == [job, second, third]
    assert result["jobs"][job]["requeues"] == 2 and result["jobs"][third]["requeues"] == 0
    from contract.results import read_metrics

    train_steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert train_steps == list(range(1, steps + 1))  # every step once across five starts: each resumed, none restarted


def test_bad_options_are_one_line_before_any_job(cluster, shared_archive, cifar, tmp_path):
    base = [*TINY, "--data", shared_archive, "--launcher", "slurm"]
    out = ["--out", tmp_path / "o", "--allow-local-out"]
    jobs_before = set(queue())
    assert one_line_error(run_all(*base, *out, "--partition", "nosuch")) == \
        "error: --partition nosuch: no such partition here; accepted: cpu"
    assert one_line_error(run_all(*base, *out, "--gpus-per-job", "1")) == \
        "error: --gpus-per-job 1: partition cpu has no GPUs; use a GPU partition, or --device cpu (no GPU per job)"
    under_tmp = Path("/tmp") / f"fixmatch-bench-{uuid.uuid4().hex}"
    line = one_line_error(run_all(*base, "--out", under_tmp))
    assert line.startswith(f"error: --out {under_tmp} is under /tmp, which every node has its own of") and \
        "--allow-local-out" in line
    assert not under_tmp.exists()
    line = one_line_error(run_all(*base, *out, "--sbatch", "constraint=nosuchfeature"))  # refused by sbatch itself
    assert line.startswith("error: sbatch refused the job of cifar10-fixmatch-40-seed0-own-")
    assert "feature" in line.lower()
    line = one_line_error(run_all(*base, *out, "--time", "2"))
    assert line.startswith("error: --time 2 is too short")

    conf = tmp_path / "slurm.conf"  # a controller nobody listens for
    conf.write_text("".join(line if not line.startswith("SlurmctldHost") else
                            line + "SlurmctldPort=1\n" for line in
                            Path("/etc/slurm/slurm.conf").read_text().splitlines(keepends=True)))
    line = one_line_error(run_all(*base, *out, env={**os.environ, "SLURM_CONF": str(conf)}))
    assert line.startswith("error: --launcher slurm: the Slurm controller does not answer (Slurmctld(primary) at ")
    no_slurm = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    assert one_line_error(run_all(*base, *out, env=no_slurm)).startswith(
        "error: --launcher slurm: no Slurm here (scontrol is not on PATH)")
    assert set(queue()) == jobs_before  # nothing was submitted
