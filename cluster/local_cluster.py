"""A real two-node Ray cluster on this machine: a head and a separate worker node.

python -m cluster.local_cluster start --dir /tmp/raylift-cluster
python -m cluster.local_cluster stop --dir /tmp/raylift-cluster

Each node is its own `ray start --block` (its own raylet, object store and resources; the
worker node joins the head with `--address`), in its own process session. Both use a temp dir
and ports of their own, so another Ray on the machine (a test session's, `raylift finetune`'s
embedded one) is never touched: `stop` kills this cluster's processes by pid, never with
`ray stop`, which stops every Ray on the machine. Token auth is on, with a token file in the
cluster's folder; `start` prints the environment a client needs (the token itself is never
printed). The worker node advertises the custom resource `raylift_worker_node`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["LocalCluster", "add_worker", "start", "stop", "stop_worker", "write_token"]

WORKER_RESOURCE = "raylift_worker_node"
_STATE_FILE = "cluster.json"
# Small object stores: the default (30% of RAM per node) would reserve most of /dev/shm twice.
_OBJECT_STORE_BYTES = 512 * 1024**2
_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)
_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")


@dataclass
class LocalCluster:
    """What `start` wrote to `<dir>/cluster.json`: enough to use and to stop the cluster."""

    dir: str
    address: str  # the Jobs API / dashboard, http://127.0.0.1:PORT
    gcs_address: str  # what a worker node or `ray.init(address=...)` joins
    token_path: str
    head_pid: int
    worker_pids: list[int] = field(default_factory=list)

    def client_env(self) -> dict[str, str]:
        """Environment a client (raylift submit, ray job submit) needs to reach this cluster."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }

    def save(self) -> None:
        Path(self.dir, _STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> LocalCluster:
        path = Path(directory, _STATE_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"no cluster started in {directory} ({path} is missing)")
        return cls(**json.loads(path.read_text()))


def start(
    directory: str | Path, head_cpus: int = 3, worker_cpus: int = 1, timeout_s: float = 90
) -> LocalCluster:
    """Start the head, then one worker node; return once both are alive."""
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    token_path = root / "auth_token"
    write_token(token_path, secrets.token_hex(32))
    ports = _free_ports([*_HEAD_PORTS, *_NODE_PORTS])
    gcs_address = f"127.0.0.1:{ports['port']}"
    head = _launch(root, "head", _head_args(root, ports, head_cpus), token_path, gcs_address)
    cluster = LocalCluster(
        dir=str(root),
        address=f"http://127.0.0.1:{ports['dashboard-port']}",
        gcs_address=gcs_address,
        token_path=str(token_path),
        head_pid=head.pid,
    )
    cluster.save()
    try:
        _wait_for_nodes(cluster, 1, timeout_s)
        add_worker(cluster, worker_cpus, timeout_s)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def write_token(path: Path, token: str) -> None:
    """Write `token` to a new file created 0600: never readable by others, not even between
    a write and a chmod. O_EXCL on a path just unlinked also refuses a link planted there."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)


def add_worker(cluster: LocalCluster, cpus: int = 1, timeout_s: float = 90) -> int:
    """Start one more worker node; its pid once the head counts it alive."""
    alive = len(_alive_nodes(cluster))
    index = len(cluster.worker_pids)
    ports = _free_ports(_NODE_PORTS)
    args = [
        "--address",
        cluster.gcs_address,
        "--num-cpus",
        str(cpus),
        "--resources",
        json.dumps({WORKER_RESOURCE: 1}),
        *_node_args(Path(cluster.dir, f"ray-worker-{index}"), ports),
    ]
    worker = _launch(
        Path(cluster.dir), f"worker-{index}", args, Path(cluster.token_path), cluster.gcs_address
    )
    cluster.worker_pids.append(worker.pid)
    cluster.save()
    _wait_for_nodes(cluster, alive + 1, timeout_s)
    return worker.pid


def stop_worker(cluster: LocalCluster, pid: int, grace_s: float = 15) -> list[int]:
    """Stop one worker node of `cluster` (a lost node, as a preemption loses it: SIGTERM, then
    SIGKILL after `grace_s`); the cluster forgets it, so `add_worker` can bring a replacement.
    Every pid stopped."""
    if pid not in cluster.worker_pids:
        raise ValueError(f"{pid} is not a worker node of {cluster.dir}: {cluster.worker_pids}")
    stopped = stop_node(pid, grace_s)
    cluster.worker_pids.remove(pid)
    cluster.save()
    return stopped


def stop_node(pid: int, grace_s: float = 15) -> list[int]:
    """Stop one node (`ray start --block` pid) and every process it started; their pids."""
    return _stop_processes(_process_tree(pid), [pid], grace_s)


def _stop_processes(pids: list[int], nodes: list[int], grace_s: float) -> list[int]:
    """SIGINT to the `ray start --block` processes among `pids` (`nodes`; it is their Ctrl-C:
    they stop their node's processes; SIGTERM they sit out, with their GCS, for the whole
    grace), SIGTERM to the rest, up to `grace_s` to exit, then SIGKILL; `pids`."""
    for member in pids:
        _signal(member, signal.SIGINT if member in nodes else signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for member in pids:
        _signal(member, signal.SIGKILL)
    deadline = time.monotonic() + _KILLED_EXIT_S  # SIGKILL is delivered, not waited for
    while True:
        for member in pids:
            _reap(member)
        if not any(_alive(p) for p in pids) or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


# How long a SIGKILLed process may take to be gone (one in the middle of a disk write exits
# when the write returns).
_KILLED_EXIT_S = 10


def stop(cluster: LocalCluster | str | Path) -> list[int]:
    """Stop the worker nodes, then the head; every pid stopped (none is left alive)."""
    if not isinstance(cluster, LocalCluster):
        cluster = LocalCluster.load(cluster)
    # Every node at once: each may take seconds to wind down, and they do so side by side.
    # The whole cluster goes, so nothing waits on a node that is left: an idle cluster is gone
    # in about 3 s, and one that ran jobs took 13 s of graceful wind-down (its runtime-env
    # agents, GCS and raylets; 2 cores, measured), which SIGKILL after 5 s cuts short.
    nodes = [*cluster.worker_pids, cluster.head_pid]
    stopped = _stop_processes([p for pid in nodes for p in _process_tree(pid)], nodes, 5)
    stopped += stop_node_leftovers(cluster)
    deadline = time.monotonic() + _KILLED_EXIT_S
    while (left := [pid for pid in stopped if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise RuntimeError(f"processes of the cluster in {cluster.dir} still alive: {left}")
    return stopped


def stop_node_leftovers(cluster: LocalCluster) -> list[int]:
    """Processes of this cluster no longer under a node's tree (re-parented): by their pids."""
    marker = str(Path(cluster.dir, "ray-"))
    leftovers = [pid for pid in _all_pids() if marker in _cmdline(pid)]
    for pid in leftovers:
        _signal(pid, signal.SIGKILL)
        _reap(pid)
    return leftovers


def _head_args(root: Path, ports: dict[str, int], cpus: int) -> list[str]:
    return [
        "--head",
        "--num-cpus",
        str(cpus),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        *(arg for name in _HEAD_PORTS for arg in (f"--{name}", str(ports[name]))),
        *_node_args(root / "ray-head", ports),
    ]


def _node_args(temp_dir: Path, ports: dict[str, int]) -> list[str]:
    # A temp dir per node: nodes sharing one would share its runtime_resources folder, and a
    # node unpacking a job's working_dir there removed the folder the job's driver ran in
    # (the driver failed with a bare "No such file or directory" from os.getcwd).
    return [
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(temp_dir),
        "--object-store-memory",
        str(_OBJECT_STORE_BYTES),
        "--disable-usage-stats",
        *(arg for name in _NODE_PORTS for arg in (f"--{name}", str(ports[name]))),
    ]


def _launch(
    root: Path, name: str, args: list[str], token_path: Path, gcs_address: str
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env.update(
        # Inherited by every process the node starts. Ray code that finds "its" cluster by
        # itself (Ray Train's placement-group cleaner asks the state API with no address) would
        # otherwise see each Ray on the machine and fail ("Found multiple active Ray
        # instances"); the cleaner then never removed a dead run's placement group, and the
        # next run waited for its CPUs without end (seen with two test sessions' Rays).
        RAY_ADDRESS=gcs_address,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        # Job entrypoints run `python -m ...`: this interpreter's environment, as on an image.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    ray = str(Path(sys.executable).parent / "ray")
    log = (root / f"{name}.log").open("ab")
    return subprocess.Popen(
        [ray, "start", "--block", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=root,
    )


def _wait_for_nodes(cluster: LocalCluster, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in [cluster.head_pid, *cluster.worker_pids]:
            if not _alive(pid):
                raise RuntimeError(f"a node of {cluster.dir} exited: see its *.log there")
        with contextlib.suppress(OSError, ValueError):
            if len(_alive_nodes(cluster)) >= count:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{count} node(s) not alive after {timeout_s:.0f} s: see {cluster.dir}")


def _alive_nodes(cluster: LocalCluster) -> list[dict]:
    """Alive nodes as the head's state API lists them (token in the header)."""
    request = urllib.request.Request(
        f"{cluster.address}/api/v0/nodes?limit=100&filter_keys=state&filter_predicates=%3D"
        "&filter_values=ALIVE",
        headers={"Authorization": f"Bearer {Path(cluster.token_path).read_text().strip()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
    except OSError:
        return []
    return body["data"]["result"]["result"]


def _free_ports(names) -> dict[str, int]:
    """A free port for each name, all different: every socket stays bound until all are
    picked (one at a time, the kernel may hand a just-closed port out again; seen once: the
    GCS and the metrics exporter were given the same port, and the head refused to start)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in names]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return {name: sock.getsockname()[1] for name, sock in zip(names, socks, strict=True)}


def _process_tree(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _all_pids() -> list[int]:
    import psutil

    return psutil.pids()


def _cmdline(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect our own exited children so they do not linger as zombies."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", default="/tmp/raylift-cluster", help="The cluster's folder.")
    parser.add_argument("--head-cpus", type=int, default=3, help="Logical CPUs of the head.")
    parser.add_argument("--worker-cpus", type=int, default=1, help="Logical CPUs of the worker.")
    args = parser.parse_args(argv)
    if args.action == "stop":
        print(f"stopped {len(stop(args.dir))} processes")
        return 0
    cluster = start(args.dir, args.head_cpus, args.worker_cpus)
    print(f"head pid {cluster.head_pid}, worker pid {cluster.worker_pids[0]}, 2 nodes alive")
    for name, value in cluster.client_env().items():
        print(f"export {name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
