"""A Ray worker node that cannot see a folder the rest of the cluster sees, as a machine without the NFS mount.

    python tests/private_node.py GCS_ADDRESS FOLDER

Run under `unshare --mount --propagation private`: it mounts an empty tmpfs over FOLDER in its own mount namespace,
then starts a raylet (1 CPU) joining the cluster at GCS_ADDRESS, the way `ray.cluster_utils.Cluster.add_node` does,
and keeps it until SIGTERM.
"""

import signal
import subprocess
import sys
import time

import ray._private.node
import ray._private.parameter

gcs_address, folder = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", folder], check=True)
params = ray._private.parameter.RayParams(
    gcs_address=gcs_address,
    num_cpus=1,
    num_gpus=0,
    object_store_memory=150 * 1024 * 1024,
    min_worker_port=0,
    max_worker_port=0,
    include_log_monitor=False,
    node_manager_port=0,
)
params.dashboard_agent_listen_port = None
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print(node.node_id, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exits through Node's atexit clean-up
while True:
    time.sleep(1)
