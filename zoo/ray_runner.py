"""The sweep on Ray: each model is a Ray task that calls `sweep.run_local`, its row streamed back to the driver.

A task asks for `--cpus` CPUs and the memory its model needs (`memory_need`), and on a cluster with
accelerator cards for one card too (`resources={"NPU": 1}`, which Ray turns into ASCEND_RT_VISIBLE_DEVICES, or
`num_gpus=1`, CUDA_VISIBLE_DEVICES), so Ray pins each model to a card of its own and a host with 8
cards runs 8 models at once; that card's eager backend joins the comparison. A task lost with its
node (or its worker process) is retried once by Ray, then recorded as an error row; a model that no
node could ever take (Ray would queue it for ever) is an error row at once. Ctrl-C cancels
every outstanding task: the models in flight are not recorded. The per-step time and memory limits
apply inside the task, as they do locally.

Without an address a Ray is started here, bound to 127.0.0.1 (nothing listens on other interfaces),
with usage statistics off; it is stopped when the sweep ends.
"""
from __future__ import annotations

import os
import socket
from dataclasses import asdict
from pathlib import Path

from .step import Row, Settings, StepStopped, run_local

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # so that tasks import zoo, exporter and compare uninstalled
RETRIES = 1  # Ray's own retry of a task whose worker or node died
# The memory a model's task asks Ray for: what export and compare hold at their peak, about 1 GB of
# libraries plus 64 bytes per parameter (the model, its ONNX graph, its variant and eager copies:
# ViT-S 22M -> 2.4 GB, ViT-L 304M -> 20 GB). The --memory ceiling is an address-space limit inside
# the task, far above the memory really used, so it is not what the task asks for.
BASE_MEMORY, BYTES_PER_PARAM = 1 << 30, 64


def memory_need(params: int) -> int:
    """Bytes of memory a model's task asks Ray for (see BYTES_PER_PARAM)."""
    return BASE_MEMORY + BYTES_PER_PARAM * max(params, 0)


def infeasible(request: dict, nodes: list[dict]) -> str:
    """Why no alive node of the cluster could ever run a task asking `request` ({"CPU": 1, "memory": ...}), or ""."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if any(all(have.get(key, 0) >= amount for key, amount in request.items()) for have in alive):
        return ""
    largest = {key: max((have.get(key, 0) for have in alive), default=0) for key in request}
    shown = ", ".join(f"{key} {_amount(key, request[key])} (the largest node has {_amount(key, largest[key])})" for key in request
                      if largest[key] < request[key])
    return f"no node of the Ray cluster can run it: it needs {shown}"


def _amount(key: str, value: float) -> str:
    return f"{value / 1e9:.1f} GB" if key == "memory" else f"{value:g}"
ACCELERATORS = (("NPU", "torch-npu"), ("GPU", "torch-cuda"))  # (Ray resource, the eager backend of that card)


def _task(entry: tuple, settings: Settings, backends: str) -> dict:
    """Inside a Ray worker: one model's row, as a dict; {"stopped": reason} when a step was stopped from outside."""
    import ray

    try:
        row = run_local(entry, settings, backends)
    except StepStopped as why:
        return {"stopped": str(why)}
    context = ray.get_runtime_context()
    where = f"{socket.gethostname()} (Ray node {context.get_node_id()[:8]})"
    return {"row": {**asdict(row), "node": where}}


CONNECT_S = 10.0  # how long the sweep waits for a cluster address to answer before it says none is there


def check_address(address: str, within_s: float = CONNECT_S) -> None:
    """A one-line UserError, within `within_s` seconds, when nothing answers at the cluster `address`
    (HOST:PORT of the head's GCS, or ray://HOST:PORT of a Ray client server). Ray's own connect retries for
    minutes and floods warnings; a TCP connect answers at once, so a typo or a stopped cluster is said plainly.
    "auto" (find a running cluster here) is left to Ray."""
    import importlib.util

    from vitparity.errors import UserError

    if address == "auto":
        return
    client = address.startswith("ray://")
    if client and importlib.util.find_spec("grpc") is None:  # the client's transport; not in every Ray install
        raise UserError(f"--ray {address}: a ray:// address needs the Ray client: pip install 'ray[client]', "
                        f"or give the head's HOST:PORT (e.g. head:6379)")
    rest = address[len("ray://"):] if client else address
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "10001" if client else "6379")
    host = host.strip("[]")
    try:
        port_number = int(port)
        if not 0 < port_number < 65536 or not host:
            raise ValueError
    except ValueError:
        raise UserError(f"--ray {address} is not an address; write HOST:PORT (e.g. head:6379) or ray://HOST:PORT") from None
    try:
        with socket.create_connection((host, port_number), timeout=within_s):
            pass
    except OSError as error:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({error.strerror or error}); start one with "
                        f"ray start --head, or drop the address to start a Ray here") from None


def start(address: str):
    """Connect to the cluster at `address`, or start a Ray here ("local"); return the ray module."""
    if address == "local":
        # Before ray is imported: a local Ray listens on the loopback address only (Ray's own switch for
        # hosts that are not in a cluster), and sends no usage statistics.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        from vitparity.errors import UserError

        raise UserError("--ray needs Ray: pip install -e '.[ray]'") from None
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}}
    if address == "local":
        ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 runtime_env=env, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, runtime_env=env, configure_logging=False)
    return ray


def run_on_ray(todo: list[tuple], settings: Settings, record, address: str, cpus: float, status) -> None:
    """Run every entry of `todo` as a Ray task; `record(row, name, why)` hears each as it finishes (row None: not recorded)."""
    ray = start(address)
    try:
        have = ray.cluster_resources()
        # One card per model where the cluster has cards, and that card's eager backend in the comparison.
        card, eager = next(((r, b) for r, b in ACCELERATORS if have.get(r, 0) >= 1), (None, None))
        resources = {} if card is None else {"num_gpus": 1} if card == "GPU" else {"resources": {card: 1}}
        backends = "torch-cpu,ort-cpu" + (f",{eager}" if eager else "")
        nodes, pending = ray.nodes(), {}
        for entry in todo:
            need = memory_need(entry[2])
            why = infeasible({"CPU": cpus, "memory": need, **({card: 1} if card else {})}, nodes)
            if why:  # Ray would queue it for ever: a row that says so instead
                name, module, params, size = entry
                record(Row(name, module, params, size, seconds=0.1, node="(none)", error=f"sweep: {why}"), name)
                continue
            task = ray.remote(_task).options(num_cpus=cpus, memory=need, max_retries=RETRIES, retry_exceptions=False, **resources)
            pending[task.remote(entry, settings, backends)] = entry
        status(f"{len(pending)} models on Ray ({int(have.get('CPU', 0))} CPUs" + (f", one {card} each)" if card else ")"))
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                entry = pending.pop(done[0])
                try:
                    found = ray.get(done[0])
                except ray.exceptions.RayError as error:  # lost with its worker or node, even after the retry
                    name, module, params, size = entry
                    kind = type(error).__name__
                    record(Row(name, module, params, size, seconds=0.1, node="(lost)",
                               error=f"sweep: the Ray task was lost ({kind}) and its retry too"), name)
                    continue
                if "stopped" in found:
                    record(None, entry[0], found["stopped"])
                else:
                    record(Row(**found["row"]), entry[0])
                status(f"{len(pending)} models left on Ray")
        except BaseException:  # Ctrl-C, SIGTERM: the models in flight are not recorded
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        ray.shutdown()
