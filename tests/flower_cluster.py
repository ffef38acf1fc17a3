"""Start a real Flower SuperLink and SuperNodes on loopback for tests, and run the app on them.

Every process gets free ports, a temporary FLWR_HOME and its own session, so a test can kill a
node (or everything) by process group. Polling is shortened where Flower lets us (the SuperNode's
executor), and telemetry is off (the test machines have no internet).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOWER_BIN = pathlib.Path(sys.executable).parent


def make_tls_files(folder):
    """Write a throwaway CA and a server certificate for 127.0.0.1/localhost; return the paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def certificate(subject_name, public_key, issuer_name, signing_key, is_ca, names=()):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                               subject_name)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                              issuer_name)]))
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None),
                                  critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                            critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = certificate("test CA", ca_key.public_key(), "test CA", ca_key, True)
    server = certificate("127.0.0.1", server_key.public_key(), "test CA", ca_key, False,
                         [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                          x509.DNSName("localhost")])
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


def make_node_key(path):
    """Write an ECDSA P-384 key pair in OpenSSH format (path, path.pub); return the path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    pathlib.Path(f"{path}.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout} s")


class Cluster:
    """One SuperLink and N SuperNodes on loopback, insecure or with TLS and node authentication.

    Args:
        home: a temporary folder (FLWR_HOME, logs).
        num_nodes: N; node p gets node config 'partition-id=p num-partitions=N'.
        tls: None, or a dict with 'ca', 'cert', 'key' paths (server certificate for 127.0.0.1).
        node_keys: None, or one OpenSSH private key path per node (SuperNode authentication).
        extra_node_config: {partition: "key=value ..."} added to those nodes' node config.
    """

    def __init__(self, home, num_nodes=2, tls=None, node_keys=None, extra_node_config=None):
        self.home, self.num_nodes, self.tls, self.node_keys = home, num_nodes, tls, node_keys
        self.extra_node_config = extra_node_config or {}
        self.port = free_port()
        self.processes, self.nodes, self.node_ids = [], {}, {}
        # Every Flower command comes from this interpreter's folder, and so do the processes
        # they start themselves (flower-superexec, flwr-clientapp): a venv need not be active.
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
                    "XDG_CACHE_HOME": str(home / "cache"),  # the nodes' data cache
                    "PATH": f"{FLOWER_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        security = (["--root-certificates", str(tls["ca"])] if tls else ["--insecure"])
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            + (f'root-certificates = "{tls["ca"]}"\n' if tls else "insecure = true\n"))
        self._security = security

    def start(self):
        link = [str(FLOWER_BIN / "flower-superlink"), "--disable-runtime-dependency-installation",
                "--port", str(self.port)]
        link += (["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile",
                  str(self.tls["cert"]), "--ssl-keyfile", str(self.tls["key"])]
                 if self.tls else ["--insecure"])
        if self.node_keys:
            link.append("--enable-supernode-auth")
        self.link = self._spawn(link, "superlink")
        _wait_for(self._port_open, 60, "SuperLink")
        for key in self.node_keys or ():
            self.register(key)
        for partition in range(self.num_nodes):
            self.start_node(partition)
        self.wait_for_nodes(self.num_nodes)
        return self

    def register(self, key):
        """Register the public key of `key` with the SuperLink; return the node id it gets."""
        results = []
        # Registration goes through the Control API, which may come up after the port.
        _wait_for(lambda: results.append(self.flwr("supernode", "register", f"{key}.pub",
                                                   "test", "--format", "json"))
                  or results[-1].returncode == 0, 60, f"registration of {key}")
        self.node_ids[key] = int(json.loads(results[-1].stdout)["node-id"])
        return self.node_ids[key]

    def node_command(self, partition, key=None, extra=""):
        command = [str(FLOWER_BIN / "flower-supernode"), *self._security, "--superlink",
                   f"127.0.0.1:{self.port}", "--port", str(free_port()),
                   "--node-config", f"partition-id={partition} num-partitions={self.num_nodes} "
                   f"{self.extra_node_config.get(partition, '')} {extra}".strip()]
        key = key or (self.node_keys[partition] if self.node_keys else None)
        return command + (["--auth-supernode-private-key", str(key)] if key else [])

    def start_node(self, partition, key=None, name=None, extra=""):
        """Start a SuperNode claiming `partition` (with another key, log name or node config
        if given)."""
        process = self._spawn(self.node_command(partition, key, extra),
                              name or f"node{partition}")
        if name is None:
            self.nodes[partition] = process
        return process

    def wait_for_nodes(self, count, timeout=90):
        _wait_for(lambda: self.log("superlink").count("Activated node_id") >= count, timeout,
                  f"{count} activated SuperNodes")

    def kill_node(self, partition):
        os.killpg(self.nodes[partition].pid, signal.SIGKILL)
        self.nodes[partition].wait(timeout=30)

    def flwr(self, *arguments, timeout=120):
        """Run the flwr CLI against this SuperLink; return the CompletedProcess."""
        return subprocess.run([str(FLOWER_BIN / "flwr"), *arguments], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def run_app(self, config_file, timeout=900, **run_config):
        """`flwr run . test --stream` with the config file; return the CompletedProcess."""
        return subprocess.run(self.run_command(config_file, **run_config), cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_app(self, config_file, **run_config):
        """Start `flwr run . test --stream` in the background; return the Popen (text output)."""
        return subprocess.Popen(self.run_command(config_file, **run_config), cwd=ROOT,
                                env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def run_command(self, config_file, **run_config):
        settings = " ".join([f'config-file="{config_file}"', f"num-nodes={self.num_nodes}"]
                            + [f"{key.replace('_', '-')}={value}"
                               for key, value in run_config.items()])
        return [str(FLOWER_BIN / "flwr"), "run", ".", "test", "--stream",
                "--run-config", settings]

    def log(self, name):
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self):
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)

    def _spawn(self, command, name):
        with open(self.home / f"{name}.log", "ab") as log:
            process = subprocess.Popen(command, cwd=self.home, env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def _port_open(self):
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0
