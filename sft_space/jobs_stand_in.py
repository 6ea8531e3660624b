"""A stand-in for the Hugging Face Jobs API on this machine, switched on with SFT_SPACE_JOBS_API=local (never on a
Space): `LocalJobsApi` has huggingface_hub's HfApi job and bucket method names and signatures (a test checks them
against the installed huggingface_hub), and runs each job's real command as a process of this machine, with each
volume a local folder. How hub_jobs.py is tested without the Hub or a GPU, and how it can be shown offline.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from . import runs
from .child import signal_group

# A job's stages after which it runs no more (huggingface_hub's JobStage).
TERMINAL_STAGES = ("COMPLETED", "CANCELED", "ERROR", "DELETED")

# The stand-in's flavors: every Jobs flavor huggingface_hub names with a GPU (and one CPU flavor), with its GPU, their
# count and their memory in all, at prices per hour near the Hub's (the Hub's own come from list_jobs_hardware).
LOCAL_FLAVORS = (
    ("cpu-basic", "CPU Basic", "2 vCPU", None, 0.01),
    ("t4-small", "Nvidia T4 - small", "4 vCPU", ("T4", "1", "16 GB"), 0.40),
    ("t4-medium", "Nvidia T4 - medium", "8 vCPU", ("T4", "1", "16 GB"), 0.60),
    ("l4x1", "1x Nvidia L4", "8 vCPU", ("L4", "1", "24 GB"), 0.80),
    ("l4x4", "4x Nvidia L4", "48 vCPU", ("L4", "4", "96 GB"), 3.80),
    ("l40sx1", "1x Nvidia L40S", "8 vCPU", ("L40S", "1", "48 GB"), 1.80),
    ("l40sx4", "4x Nvidia L40S", "48 vCPU", ("L40S", "4", "192 GB"), 8.30),
    ("l40sx8", "8x Nvidia L40S", "192 vCPU", ("L40S", "8", "384 GB"), 23.50),
    ("a10g-small", "Nvidia A10G - small", "4 vCPU", ("A10G", "1", "24 GB"), 1.00),
    ("a10g-large", "Nvidia A10G - large", "12 vCPU", ("A10G", "1", "24 GB"), 1.50),
    ("a10g-largex2", "2x Nvidia A10G - large", "24 vCPU", ("A10G", "2", "48 GB"), 3.00),
    ("a10g-largex4", "4x Nvidia A10G - large", "48 vCPU", ("A10G", "4", "96 GB"), 5.00),
    ("a100-large", "Nvidia A100 - large", "12 vCPU", ("A100", "1", "80 GB"), 2.50),
    ("a100x4", "4x Nvidia A100", "48 vCPU", ("A100", "4", "320 GB"), 10.00),
    ("a100x8", "8x Nvidia A100", "96 vCPU", ("A100", "8", "640 GB"), 20.00),
    ("h200", "Nvidia H200", "23 vCPU", ("H200", "1", "141 GB"), 5.00),
    ("h200x2", "2x Nvidia H200", "46 vCPU", ("H200", "2", "282 GB"), 10.00),
    ("h200x4", "4x Nvidia H200", "92 vCPU", ("H200", "4", "564 GB"), 20.00),
    ("h200x8", "8x Nvidia H200", "184 vCPU", ("H200", "8", "1128 GB"), 40.00),
    ("rtx-pro-6000", "Nvidia RTX PRO 6000", "12 vCPU", ("RTX PRO 6000", "1", "96 GB"), 2.50),
    ("rtx-pro-6000x2", "2x Nvidia RTX PRO 6000", "24 vCPU", ("RTX PRO 6000", "2", "192 GB"), 5.00),
    ("rtx-pro-6000x4", "4x Nvidia RTX PRO 6000", "48 vCPU", ("RTX PRO 6000", "4", "384 GB"), 10.00),
    ("rtx-pro-6000x8", "8x Nvidia RTX PRO 6000", "96 vCPU", ("RTX PRO 6000", "8", "768 GB"), 20.00),
)
LOCAL_USER = "local-user"
# What the stand-in's cancel does, as container platforms do: SIGTERM, then SIGKILL after this grace.
LOCAL_CANCEL_GRACE_SECONDS = 30.0


class LocalJobsApi:
    """huggingface_hub's HfApi job and bucket methods, same names and signatures, on this machine: a bucket is a
    folder under `root/buckets`, and a job is its command run as a process (in its own process group) whose
    volumes are folders; each argument that names a mount path names the folder instead. The job's secrets
    reach its environment only, as on the Hub. A job's network group and aliases are recorded (job.json), not
    made: its jobs share this machine's network, where the aliases name nothing. For tests and demos: prices are
    near the Hub's, not its own."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.cancel_grace_seconds = LOCAL_CANCEL_GRACE_SECONDS
        # The jobs this object started; a job started before (by another process, or before an app restart) is
        # known by its job.json and its process group.
        self._processes: dict[str, subprocess.Popen] = {}
        self._state_lock = threading.RLock()

    # -------------------------------------------------------------------- account, hardware, buckets

    def whoami(self, token: bool | str | None = None, *, cache: bool = False) -> dict:
        return {"name": LOCAL_USER, "type": "user"}

    def list_jobs_hardware(self, token: bool | str | None = None) -> list:
        from huggingface_hub import JobHardwareInfo

        listed = []
        for name, pretty, cpu, gpu, per_hour in LOCAL_FLAVORS:
            accelerator = None if gpu is None else {"type": "gpu", "model": gpu[0], "quantity": gpu[1],
                                                    "vram": gpu[2], "manufacturer": "Nvidia"}
            listed.append(JobHardwareInfo(name=name, prettyName=pretty, cpu=cpu, ram="", accelerator=accelerator,
                                          unitCostMicroUSD=round(per_hour / 60 * 1e6),
                                          unitCostUSD=per_hour / 60, unitLabel="minute"))
        return listed

    def _bucket(self, bucket_id: str) -> Path:
        return self.root / "buckets" / bucket_id

    def create_bucket(self, bucket_id: str, *, private: bool | None = None, visibility: Any = None,
                      resource_group_id: str | None = None, region: Any = None, exist_ok: bool = False,
                      token: bool | str | None = None) -> Any:
        path = self._bucket(bucket_id)
        if path.exists() and not exist_ok:
            raise FileExistsError(f"bucket {bucket_id} exists")
        path.mkdir(parents=True, exist_ok=True)
        return f"hf://buckets/{bucket_id}"

    def sync_job_volume(self, source: str | Path, mount_path: str, *, remote_name: str | None = None,
                        read_only: bool = True, namespace: str | None = None,
                        token: bool | str | None = None) -> Any:
        from huggingface_hub import Volume

        bucket_id = f"{namespace or LOCAL_USER}/jobs-artifacts"
        folder = remote_name or f"{Path(source).resolve().name}-" + \
            hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:8]
        shutil.copytree(source, self._bucket(bucket_id) / folder, dirs_exist_ok=True)
        return Volume(type="bucket", source=bucket_id, mount_path=mount_path, path=folder, read_only=read_only)

    def batch_bucket_files(self, bucket_id: str, *, add: list | None = None, copy: list | None = None,
                           delete: list | None = None, token: str | bool | None = None) -> None:
        for content, remote in add or []:
            target = self._bucket(bucket_id) / remote
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copy2(content, target)
        for remote in delete or []:
            (self._bucket(bucket_id) / remote).unlink(missing_ok=True)

    def download_bucket_files(self, bucket_id: str, files: list, *, raise_on_missing_files: bool = False,
                              token: str | bool | None = None) -> None:
        for remote, local in files:
            source = self._bucket(bucket_id) / str(remote)
            if source.is_file():
                Path(local).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, local)
            elif raise_on_missing_files:
                raise FileNotFoundError(f"{remote} is not in bucket {bucket_id}")

    def sync_bucket(self, source: str | None = None, dest: str | None = None, *, delete: bool = False,
                    ignore_times: bool = False, ignore_sizes: bool = False, existing: bool = False,
                    ignore_existing: bool = False, include: list[str] | None = None,
                    exclude: list[str] | None = None, filter_from: str | None = None, plan: str | None = None,
                    apply: str | None = None, dry_run: bool = False, verbose: bool = False, quiet: bool = False,
                    token: bool | str | None = None) -> Any:
        def local(path: str) -> Path:
            prefix = "hf://buckets/"
            return self.root / "buckets" / path[len(prefix):] if path.startswith(prefix) else Path(path)

        origin, target = local(source or ""), local(dest or "")
        if not origin.is_dir():
            return None
        for path in origin.rglob("*"):
            relative = str(path.relative_to(origin))
            if not path.is_file() or any(fnmatch.fnmatch(relative, p) for p in exclude or []):
                continue
            if include and not any(fnmatch.fnmatch(relative, p) for p in include):
                continue
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)
        return None

    # -------------------------------------------------------------------- jobs

    def _job_folder(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def _local_path(self, volume: Any) -> Path:
        folder = self._bucket(volume.source)
        return folder / volume.path if volume.path else folder

    def run_job(self, *, image: str, command: list[str], env: dict[str, Any] | None = None,
                secrets: dict[str, Any] | None = None, flavor: Any = None, timeout: int | float | str | None = None,
                attempts: int | None = None, name: str | None = None, labels: dict[str, str] | None = None,
                volumes: list | None = None, expose: list[int] | None = None, expose_public: list[int] | None = None,
                ssh: bool = False, network_group: str | None = None, network_aliases: list[str] | None = None,
                resource_group_id: str | None = None, namespace: str | None = None,
                token: bool | str | None = None) -> Any:
        if network_aliases and not network_group:
            raise ValueError("network_aliases requires network_group")
        mounts = {v.mount_path: self._local_path(v) for v in volumes or []}
        for path in mounts.values():
            path.mkdir(parents=True, exist_ok=True)

        def mapped(argument: str) -> str:
            for mount, path in mounts.items():
                if argument == mount or argument.startswith(mount + "/"):
                    return str(path) + argument[len(mount):]
            return argument

        job_id = f"local-{time.strftime('%Y%m%d%H%M%S')}-{os.urandom(3).hex()}"
        folder = self._job_folder(job_id)
        folder.mkdir(parents=True)
        # The job's environment: this machine's (for its PATH and Python), less any token of ours, plus the job's
        # env and, as on the Hub, its secrets; the secrets are written nowhere.
        environment = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        environment.update({k: str(v) for k, v in (env or {}).items()})
        environment.update({k: str(v) for k, v in (secrets or {}).items()})
        with (folder / "log.txt").open("wb") as output:
            process = subprocess.Popen([mapped(a) for a in command], stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
        now = _now()
        state = {"id": job_id, "pid": process.pid, "created_at": now, "started_at": now, "flavor": str(flavor),
                 "image": image, "command": command, "labels": labels or {}, "namespace": namespace or LOCAL_USER,
                 "timeout": timeout, "volumes": [v.to_dict() for v in volumes or []], "cancelled": False,
                 "network_group": network_group, "network_aliases": network_aliases or []}
        runs.write_json_atomic(folder / "job.json", state)
        self._processes[job_id] = process
        threading.Thread(target=self._reap, args=(process, folder), daemon=True).start()
        return self.inspect_job(job_id=job_id)

    def _reap(self, process: subprocess.Popen, folder: Path) -> None:
        process.wait()
        self._state(folder.name)

    def _state(self, job_id: str) -> dict[str, Any]:
        """The job's state; for a job of this object's, once its process has ended, with its exit status."""
        with self._state_lock:
            path = self._job_folder(job_id) / "job.json"
            state = json.loads(path.read_text())
            process = self._processes.get(job_id)
            if process is not None and process.poll() is not None and "exit_code" not in state:
                state.update(exit_code=process.returncode, finished_at=_now())
                runs.write_json_atomic(path, state)
            return state

    def _alive(self, state: dict[str, Any]) -> bool:
        if "exit_code" in state:
            return False
        try:
            os.killpg(state["pid"], 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def inspect_job(self, *, job_id: str, namespace: str | None = None, token: bool | str | None = None) -> Any:
        from huggingface_hub import JobInfo

        folder = self._job_folder(job_id)
        if not (folder / "job.json").is_file():
            raise FileNotFoundError(f"no job {job_id}")
        state = self._state(job_id)
        alive = self._alive(state)
        if alive:
            stage, message = "RUNNING", None
        elif state.get("cancelled"):
            stage, message = "CANCELED", "Job canceled by user"
        elif state.get("exit_code") == 0:
            stage, message = "COMPLETED", None
        else:
            code = state.get("exit_code")
            stage = "ERROR"
            message = "Job ended without an exit status" if code is None else f"Job failed with exit code: {code}"
            if code == -signal.SIGKILL:
                message = "OOMKilled: the job's process was killed (exit 137)"
        finished = state.get("finished_at") or (None if alive else _now())
        running = _seconds_between(state["started_at"], finished or _now())
        volumes = [{"type": v["type"], "source": v["source"], "mountPath": v["mountPath"], "path": v.get("path"),
                    "readOnly": v.get("readOnly")} for v in state["volumes"]]
        return JobInfo(id=job_id, createdAt=state["created_at"], startedAt=state["started_at"], finishedAt=finished,
                       dockerImage=state["image"], command=state["command"], arguments=[], environment={},
                       secrets={}, flavor=state["flavor"], labels=state["labels"], volumes=volumes,
                       status={"stage": stage, "message": message},
                       durations={"runningSecs": int(running), "totalSecs": int(running)},
                       owner={"id": LOCAL_USER, "name": state["namespace"], "type": "user"},
                       endpoint="http://localhost")

    def fetch_job_logs(self, *, job_id: str, namespace: str | None = None, follow: bool = False,
                       tail: int | None = None, token: bool | str | None = None) -> Iterable[str]:
        path = self._job_folder(job_id) / "log.txt"
        with path.open("rb") as handle:
            pending = b""
            while True:
                chunk = handle.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith(b"\n"):
                        yield pending.decode("utf-8", "replace").rstrip("\r\n")
                        pending = b""
                    continue
                if not follow or str(self.inspect_job(job_id=job_id).status.stage) in TERMINAL_STAGES:
                    if pending:
                        yield pending.decode("utf-8", "replace")
                    return
                time.sleep(0.2)

    def fetch_job_metrics(self, *, job_id: str, namespace: str | None = None, follow: bool = False,
                          token: bool | str | None = None) -> Iterable[dict[str, Any]]:
        yield {"cpu_usage_pct": 0, "memory_used_bytes": 0, "gpus": {}}

    def cancel_job(self, *, job_id: str, namespace: str | None = None, token: bool | str | None = None) -> None:
        folder = self._job_folder(job_id)
        with self._state_lock:
            state = self._state(job_id)
            if not self._alive(state):
                return
            state["cancelled"] = True
            runs.write_json_atomic(folder / "job.json", state)
        signal_group(state["pid"], signal.SIGTERM)
        threading.Thread(target=self._kill_after_grace, args=(state,), daemon=True).start()

    def _kill_after_grace(self, state: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.cancel_grace_seconds
        while time.monotonic() < deadline:
            if not self._alive(self._state(state["id"])):
                return
            time.sleep(0.2)
        signal_group(state["pid"], signal.SIGKILL)

    def wait_for_job(self, job_id: str | list[str], *, timeout: float | None = None, poll_interval: float = 1.0,
                     stages: list | None = None, namespace: str | None = None,
                     token: bool | str | None = None) -> Any:
        wanted = set(map(str, stages or [])) | set(TERMINAL_STAGES)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.inspect_job(job_id=job_id)
            if str(info.status.stage) in wanted:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Job '{job_id}' is still in stage '{info.status.stage}' after {timeout} seconds.")
            time.sleep(poll_interval)


# Times as the Hub writes them in a job's JSON.
HUB_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime(HUB_TIME)


def _seconds_between(start: str, end: str) -> float:
    def parsed(text: str) -> datetime.datetime:
        return datetime.datetime.strptime(text, HUB_TIME)

    return max(0.0, (parsed(end) - parsed(start)).total_seconds())


# The HfApi methods the stand-in stands for (a test checks their signatures against the installed huggingface_hub).
STAND_IN_METHODS = ("whoami", "list_jobs_hardware", "create_bucket", "sync_job_volume", "batch_bucket_files",
                    "download_bucket_files", "sync_bucket", "run_job", "inspect_job", "fetch_job_logs",
                    "fetch_job_metrics", "cancel_job", "wait_for_job")
