"""A real multi-node Ray cluster on this one machine, for the node-loss tests.

Each node is a ``ray start --block`` process of its own (the head, then workers joined
with ``--address``), with its own temp dir, ports, CPUs and custom resources, at a
loopback address of its own (127.0.0.2, 127.0.0.3, ...), with token authentication on.
SIGKILL of a worker node's raylet is what a lost machine looks like to the rest.

Nothing here touches a cluster it did not start: every port is picked free, every node
has its own ``--temp-dir`` (so ``ray start`` records the address there, not in
/tmp/ray/ray_current_cluster where a bare ``ray.init()`` elsewhere would find it), the
address and token are set only in the environments this object hands out, and teardown
ends only the processes it started and their children.

Why not 127.0.0.1: for a multi-node cluster Ray replaces a node address of 127.0.0.1
(or localhost) with the machine's routable address (``resolve_ip_for_localhost``); other
127.x addresses are loopback too and are kept. Ray 2.60's gRPC servers then listen on
all interfaces (only a node at 127.0.0.1, i.e. a single-node cluster, binds loopback
only), which is why token authentication matters here.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
# The raylet waits a fixed 15 s for its dashboard agent to write its port file, then
# aborts (ray-project/ray#65983); on a loaded machine the agent can take longer.
_AGENT_TIMEOUT = "Timed out waiting for file"


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this process: a port is only
    bound when its node starts, so the OS may offer a closed one again meanwhile (it
    did: `ray start` then refused two components on one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@dataclass
class Node:
    name: str
    ip: str
    proc: subprocess.Popen  # `ray start --block`: the node's processes are its children
    log: str
    temp: str
    procs: list[psutil.Process] = field(default_factory=list)  # every process seen under it

    def remember(self) -> None:
        try:
            self.procs.extend(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def raylet_pid(self) -> int:
        self.remember()
        for p in self.procs:
            if _running(p) and p.name() == "raylet":
                return p.pid
        raise RuntimeError(f"node {self.name} has no raylet (see {self.log})")

    def hosts(self, title: str) -> bool:
        """True if a process of this node is titled ``title`` (e.g. a Train worker)."""
        self.remember()
        return any(_running(p) and p.name().startswith(title) for p in self.procs)


@dataclass
class LocalCluster:
    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="dbn-", dir="/tmp"))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)  # every node started, dead ones too

    @property
    def address(self) -> str:
        return f"{self.nodes[0].ip}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a driver that joins this cluster."""
        return {**self._base_env(), "RAY_ADDRESS": self.address, **extra}

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,  # never ~/.ray/auth_token: that may be another cluster's
            RAY_USAGE_STATS_ENABLED="0",
            # A dead raylet is found after 5 failed checks 1 s apart (default 3 s apart).
            RAY_health_check_period_ms="1000",
            RAY_health_check_initial_delay_ms="1000",
            # A loaded machine can take minutes to start a node (default 30 s).
            RAY_raylet_start_wait_time_s="300",
        )
        return env

    def start_node(self, name: str, ip: str, *, cpus: int, resources: dict[str, float] | None = None) -> Node:
        """Start a node (the first is the head) at loopback address ``ip``; retried when
        its raylet gives up on a slow agent (``_AGENT_TIMEOUT``)."""
        for attempt in range(5):
            node = self._launch(f"{name}-{attempt}", ip, cpus, resources)
            failure = self._wait_for(node)
            if failure is None:
                node.name = name
                return node
            self._end(node)
            if _AGENT_TIMEOUT not in failure:
                break
        raise RuntimeError(f"node {name} did not start:\n{failure}")

    def _launch(self, name: str, ip: str, cpus: int, resources: dict[str, float] | None) -> Node:
        head = not self.nodes
        temp = os.path.join(self.root, name)
        os.makedirs(temp)
        log = os.path.join(self.root, f"{name}.log")
        cmd = [
            *RAY, "start", "--block", "--disable-usage-stats",
            f"--node-ip-address={ip}", f"--temp-dir={temp}", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}", "--object-store-memory=100000000",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            # Workers bind ports the OS picks, not Ray's default range another cluster uses.
            "--min-worker-port=0", "--max-worker-port=0",
        ]  # fmt: skip
        if head:
            cmd += ["--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}",
                    "--include-dashboard=false", f"--dashboard-port={free_port()}"]  # fmt: skip
        else:
            cmd += [f"--address={self.address}"]
        with open(log, "w") as f:
            # A session of its own: a signal to the test's process group never reaches it.
            proc = subprocess.Popen(
                cmd, env=self._base_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(name, ip, proc, log, temp, [psutil.Process(proc.pid)])
        self.nodes.append(node)
        return node

    def _wait_for(self, node: Node, timeout: float = 600) -> str | None:
        """None once the node runs, else why it does not."""
        deadline = time.monotonic() + timeout
        while True:
            node.remember()
            text = open(node.log).read()
            if "Ray runtime started" in text:
                return None
            err = os.path.join(node.temp, "session_latest", "logs", "raylet.err")
            err = open(err).read() if os.path.exists(err) else ""
            if "Check failed" in err or node.proc.poll() is not None or time.monotonic() > deadline:
                fatal = next((line for line in err.splitlines() if "Check failed" in line), "")
                return f"{fatal}\n{text[-3000:]}{_log_tails(node)}"
            time.sleep(0.5)

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the node's raylet, as when a machine vanishes; returns its pid."""
        pid = node.raylet_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def _end(self, node: Node) -> None:
        """SIGKILL the node's processes: a test node keeps nothing worth a graceful stop,
        and `ray start --block`'s own (SIGTERM) takes up to 15 s a node."""
        node.remember()
        procs = [p for p in node.procs if _running(p)]
        for p in procs:
            _kill(p)
        psutil.wait_procs(procs, timeout=10)
        node.proc.wait()

    def stop(self) -> None:
        """End every process this cluster started (and their children), then its files."""
        for node in reversed(self.nodes):  # workers first, the head last
            self._end(node)
        # A process started under a node after it was last looked at (a Ray worker)
        # still carries the node's temp dir, which is this cluster's alone.
        stray = [psutil.Process(int(line.split(":")[0])) for line in self.leftovers()]
        for p in stray:
            _kill(p)
        psutil.wait_procs(stray, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Processes still running with this cluster's temp dir on their command line."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if self.root in cmd and p.pid != os.getpid():
                found.append(f"{p.pid}: {cmd[:200]}")
        return found


def _log_tails(node: Node) -> str:
    """The ends of a node's raylet, GCS and agent logs, for a failure message."""
    out = []
    for f in sorted(glob.glob(os.path.join(node.temp, "session_latest", "logs", "*"))):
        if os.path.basename(f).startswith(("raylet.", "gcs_server.", "dashboard_agent")):
            out.append(f"\n--- {f}\n" + open(f, errors="replace").read()[-3000:])
    return "".join(out)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
