"""A real multi-node Ray cluster on one machine: each node in its own Linux network namespace.

Every node gets its own address on a private test subnet (10.213.0.0/24) through a veth pair to a
bridge, and the bridge lives in a namespace of its own: nothing is added to the machine's own
network, and all traffic stays inside the namespaces made here. Each node is one
``ray start --block`` process with its own resources and temp dir; its ports are private to its
namespace, so the cluster can use Ray's default ports without meeting other Ray instances.
Needs root (``ip netns``). Stopping kills exactly the processes inside these namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"
HEAD_PORT = 6379
# The head's health checks of the other nodes: a node found dead after 3 missed checks 1 s apart
# instead of Ray's 5 checks 3 s apart, so that a test that kills a node waits seconds, not ~15 s.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
RAY = str(Path(sys.executable).parent / "ray")


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def can_make_namespaces() -> bool:
    probe = f"lrra-probe-{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
    except (OSError, subprocess.CalledProcessError):
        return False
    sh("ip", "netns", "del", probe)
    return True


@dataclass
class Node:
    namespace: str
    ip: str
    process: subprocess.Popen | None = None


@dataclass
class NetnsCluster:
    """``with NetnsCluster(root, [{"CPU": 2, "lrra_driver": 8}, {"CPU": 1}]) as c:`` -- node 0 is the head."""

    root: Path
    resources: list[dict[str, float]]
    tag: str = field(default_factory=lambda: str(os.getpid()))
    head_args: list[str] = field(default_factory=list)  # e.g. --autoscaling-config=...
    env: dict[str, str] = field(default_factory=dict)   # for every node, e.g. RAY_FAKE_CLUSTER=1
    nodes: list[Node] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"lrra-sw-{self.tag}"

    @property
    def address(self) -> str:
        return f"{self.nodes[0].ip}:{HEAD_PORT}"

    @property
    def auth_env(self) -> dict[str, str]:
        """Ray's token authentication, with this cluster's own token: every node and client needs it."""
        token = self.root / "ray-token"
        if not token.exists():
            token.write_text(secrets.token_hex(32))
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}

    def exec_in(self, node: int, command: list[str]) -> list[str]:
        """``command`` run inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.nodes[node].namespace, *command]

    def __enter__(self) -> NetnsCluster:
        try:
            self._network()
            for index in range(len(self.resources)):
                self._start_node(index)
            self.wait_for_nodes(len(self.resources))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)  # the nodes' Ray session folders

    def _network(self) -> None:
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for index in range(len(self.resources)):
            node = Node(f"lrra-n{index}-{self.tag}", f"{SUBNET}.{10 + index}")
            self.nodes.append(node)
            sh("ip", "netns", "add", node.namespace)
            # Both ends are created inside the namespaces: the machine's own namespace never sees them.
            sh("ip", "link", "add", "name", "eth0", "netns", node.namespace, "type", "veth",
               "peer", "name", f"port{index}", "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", f"port{index}", "master", "br0", "up")
            sh("ip", "-n", node.namespace, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            sh("ip", "-n", node.namespace, "link", "set", "eth0", "up")
            sh("ip", "-n", node.namespace, "link", "set", "lo", "up")
            # A default route into the bridge, where it ends: Ray finds a node's own address by the
            # route to the internet (a UDP connect, nothing sent); no packet leaves the namespaces.
            sh("ip", "-n", node.namespace, "route", "add", "default", "dev", "eth0")

    def _start_node(self, index: int) -> None:
        node, resources = self.nodes[index], dict(self.resources[index])
        cpus = resources.pop("CPU")
        command = [RAY, "start", "--block", f"--node-ip-address={node.ip}", f"--num-cpus={cpus:g}",
                   f"--temp-dir={self.root / f'n{index}'}", "--disable-usage-stats"]
        if resources:
            command += ["--resources", json.dumps(resources)]
        if index == 0:
            command += ["--head", f"--port={HEAD_PORT}", "--include-dashboard=true", f"--dashboard-host={node.ip}",
                        *self.head_args]
        else:
            command += [f"--address={self.address}"]
        log = open(self.root / f"n{index}.log", "wb")  # noqa: SIM115 - lives as long as the node
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **FAST_NODE_DEATH, **self.auth_env,
               **self.env}
        node.process = subprocess.Popen(self.exec_in(index, command), stdout=log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        if index == 0:
            self._wait_for_head()

    def _wait_for_head(self, timeout_s: float = 120) -> None:
        probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()"
        deadline = time.monotonic() + timeout_s
        while subprocess.run(self.exec_in(0, [sys.executable, "-c", probe, self.nodes[0].ip, str(HEAD_PORT)]),
                             capture_output=True).returncode != 0:
            if self.nodes[0].process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head did not start: {(self.root / 'n0.log').read_text()[-3000:]}")
            time.sleep(1)

    def alive_nodes(self) -> list[dict]:
        # Marked, because Ray may print autoscaler events ("(autoscaler +1s) Resized to ...") around it.
        script = ("import json,ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
                  "print('NODES ' + json.dumps(ray.nodes()))")
        env = {**os.environ, "RAY_ADDRESS": self.address, **self.auth_env}
        done = subprocess.run(self.exec_in(0, [sys.executable, "-c", script]), capture_output=True, text=True,
                              env=env, timeout=120)
        [nodes] = [line.removeprefix("NODES ") for line in done.stdout.splitlines() if line.startswith("NODES ")]
        return [n for n in json.loads(nodes) if n["Alive"]]

    def wait_for_nodes(self, count: int, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.alive_nodes())} of {count} nodes joined")
            time.sleep(2)

    def pids(self, namespace: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        return [int(pid) for pid in done.stdout.split()]

    def kill_node(self, index: int) -> None:
        """Every process of node ``index`` (its raylet, its workers), as a machine that vanishes."""
        for pid in self.pids(self.nodes[index].namespace):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Stop the nodes (workers first), kill whatever is left in the namespaces, delete them."""
        for node in reversed(self.nodes):
            if node.process is not None and node.process.poll() is None:
                os.killpg(node.process.pid, signal.SIGTERM)
        # A few seconds for a graceful stop, then SIGKILL: `ray start --block` can take ~30 s per
        # node to stop gracefully, and nothing of a test cluster needs to outlive it.
        deadline = time.monotonic() + 5
        for node in reversed(self.nodes):
            if node.process is not None:
                try:
                    node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for node in self.nodes:
            self.kill_node(self.nodes.index(node))
        for namespace in [node.namespace for node in self.nodes] + [self.switch]:
            deadline = time.monotonic() + 30
            while self.pids(namespace) and time.monotonic() < deadline:
                time.sleep(0.5)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    def stopped(self) -> bool:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return not any(node.namespace in listed for node in self.nodes) and self.switch not in listed
