"""The cluster templates in deploy/: valid for their APIs, consistent, and their scripts behave.

Core Kubernetes kinds validate against the API schema (kubernetes-validate, strict: a misspelt
field fails). Kueue and JobSet kinds have no schema there, so their fields are checked here
against the shapes of kueue.x-k8s.io/v1beta1 and jobset.x-k8s.io/v1alpha2. The SLURM batch script
and the container entry point run as real processes, with srun, scontrol and torchrun replaced
by small scripts on PATH: the schedulers' command line is the boundary we fake.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from steadytrain.config import load_config
from steadytrain.train import preflight
from tests.helpers import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
SBATCH = REPO / "deploy" / "slurm" / "train.sbatch"
# Job podFailurePolicy is GA from 1.31; the schema of the newest version not above this is used.
KUBERNETES_VERSION = "1.31"
CUSTOM_GROUPS = {"kueue.x-k8s.io", "jobset.x-k8s.io"}
PREEMPT_GRACE_S = 60  # fault.preempt_grace_s's default: the save after a preemption signal
EXIT_REQUEUE, EXIT_USAGE, EXIT_DIVERGED = 75, 2, 5

# Kueue v1beta1 / JobSet v1alpha2 fields these files may use (None: any value), from the Go types.
QUOTA = {"name": None, "nominalQuota": None, "borrowingLimit": None, "lendingLimit": None}
CUSTOM_SHAPES: dict[str, dict[str, Any]] = {
    "ResourceFlavor": {"spec": {"nodeLabels": None, "nodeTaints": None, "tolerations": None}},
    "WorkloadPriorityClass": {"value": None, "description": None},
    "LocalQueue": {"spec": {"clusterQueue": None, "stopPolicy": None}},
    "ClusterQueue": {
        "spec": {
            "cohort": None,
            "namespaceSelector": None,
            "queueingStrategy": None,
            "resourceGroups": [
                {"coveredResources": None, "flavors": [{"name": None, "resources": [QUOTA]}]}
            ],
            "preemption": {
                "reclaimWithinCohort": {"Never", "LowerPriority", "Any"},
                "withinClusterQueue": {"Never", "LowerPriority", "LowerOrNewerEqualPriority"},
                "borrowWithinCohort": {"policy": {"Never", "LowerPriority"}},
            },
            "fairSharing": {"weight": None},
        }
    },
    "JobSet": {
        "spec": {
            "suspend": None,
            "network": {"enableDNSHostnames": None, "subdomain": None},
            "failurePolicy": {
                "maxRestarts": None,
                "rules": [
                    {
                        "name": None,
                        "action": {"FailJobSet", "RestartJobSet", "RestartJob"},
                        "onJobFailureReasons": None,
                        "targetReplicatedJobs": None,
                    }
                ],
            },
            "replicatedJobs": [{"name": None, "replicas": None, "template": None}],
        }
    },
}


def load_documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


DOCUMENTS = load_documents()


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def is_custom(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def validate_core(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.absolute_path) or "(top)"
        pytest.fail(f"{name_of(doc)}: {where}: {error.message}")


def shape_errors(value: Any, shape: Any, where: str) -> list[str]:
    """Where ``value`` leaves ``shape``: a misspelt field, a value outside an enum."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        errors = [f"{where}.{key}: unknown field" for key in value if key not in shape]
        for key, sub in shape.items():
            if key in value and sub is not None:
                errors += shape_errors(value[key], sub, f"{where}.{key}")
        return errors
    if isinstance(shape, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [
            e for i, item in enumerate(value) for e in shape_errors(item, shape[0], f"{where}[{i}]")
        ]
    return [] if value in shape else [f"{where}: {value!r} is not one of {sorted(shape)}"]


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6}
_SUFFIXES |= {"G": 1e9, "T": 1e12, "": 1}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity (``64``, ``"512Gi"``, ``"500m"``) as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[mkMGT])?", str(value))
    assert match, f"{value!r} is not a Kubernetes quantity"
    return float(match.group(1)) * _SUFFIXES[match.group(2) or ""]


def workloads() -> list[tuple[dict[str, Any], dict[str, Any], int]]:
    """(workload, the batch/v1 JobSpec of its pods, number of pods) for each Job and JobSet."""
    found = [(job, job["spec"], 1) for job in of_kind("Job")]
    for jobset in of_kind("JobSet"):
        for replicated in jobset["spec"]["replicatedJobs"]:
            spec = replicated["template"]["spec"]
            found.append((jobset, spec, replicated.get("replicas", 1) * spec["parallelism"]))
    return found


WORKLOADS = workloads()
WORKLOAD_IDS = [name_of(workload) for workload, _, _ in WORKLOADS]


def trainer(job_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in job_spec["template"]["spec"]["containers"] if c["name"] == "trainer"]
    return container


def torchrun_options(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """torchrun's ``--name value`` / ``--name=value`` options, and the arguments after ``-m``."""
    assert args[0] == "torchrun", args
    options, rest = {}, args[1:]
    while rest and rest[0] != "-m":
        flag, _, value = rest.pop(0).partition("=")
        options[flag.lstrip("-").replace("_", "-")] = value or rest.pop(0)
    return options, rest[1:]


@pytest.mark.parametrize(
    "doc", [doc for _, doc in DOCUMENTS if not is_custom(doc)], ids=lambda doc: name_of(doc)
)
def test_core_documents_validate_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    validate_core(doc)


def test_every_custom_resource_has_a_checked_shape() -> None:
    custom = [doc for _, doc in DOCUMENTS if is_custom(doc)]
    assert {doc["kind"] for doc in custom} == set(CUSTOM_SHAPES)
    for doc in custom:
        shape = {"apiVersion": None, "kind": None, "metadata": None, **CUSTOM_SHAPES[doc["kind"]]}
        assert shape_errors(doc, shape, name_of(doc)) == []
        group, version = doc["apiVersion"].split("/")
        assert version == {"kueue.x-k8s.io": "v1beta1", "jobset.x-k8s.io": "v1alpha2"}[group]
    for flavor in of_kind("ResourceFlavor"):
        assert flavor["spec"]["nodeLabels"], name_of(flavor)  # else any node matches the quota
    for priority in of_kind("WorkloadPriorityClass"):
        assert isinstance(priority["value"], int), name_of(priority)


def test_the_jobset_job_template_is_a_valid_batch_job() -> None:
    for jobset in of_kind("JobSet"):
        for replicated in jobset["spec"]["replicatedJobs"]:
            template = replicated["template"]
            validate_core({"apiVersion": "batch/v1", "kind": "Job", **copy.deepcopy(template)})
            assert template["spec"]["completionMode"] == "Indexed"
            assert template["spec"]["parallelism"] == template["spec"]["completions"]


def test_cluster_queues_share_a_cohort_and_limits_stay_within_quota() -> None:
    queues = of_kind("ClusterQueue")
    flavors = {doc["metadata"]["name"] for doc in of_kind("ResourceFlavor")}
    assert len(queues) >= 2 and len({queue["spec"]["cohort"] for queue in queues}) == 1
    for queue in queues:
        assert float(queue["spec"]["fairSharing"]["weight"]) > 0, name_of(queue)
        # Kueue ignores borrowWithinCohort under fair sharing (kueue#4165): don't pretend.
        assert "borrowWithinCohort" not in queue["spec"]["preemption"], name_of(queue)
        for group in queue["spec"]["resourceGroups"]:
            for flavor in group["flavors"]:
                assert flavor["name"] in flavors
                # Kueue requires the same resources, in the same order, as coveredResources.
                assert [q["name"] for q in flavor["resources"]] == group["coveredResources"]
                for quota in flavor["resources"]:
                    nominal = quantity(quota["nominalQuota"])
                    for limit in ("borrowingLimit", "lendingLimit"):
                        assert 0 <= quantity(quota[limit]) <= nominal, (name_of(queue), quota)


def test_local_queues_point_at_cluster_queues_that_admit_their_namespace() -> None:
    namespaces = {doc["metadata"]["name"] for doc in of_kind("Namespace")}
    for local in of_kind("LocalQueue"):
        namespace = local["metadata"]["namespace"]
        queue = one("ClusterQueue", local["spec"]["clusterQueue"])
        assert namespace in namespaces
        selector = queue["spec"]["namespaceSelector"]["matchLabels"]
        assert selector == {"kubernetes.io/metadata.name": namespace}


@pytest.mark.parametrize(("workload", "job_spec", "num_pods"), WORKLOADS, ids=WORKLOAD_IDS)
def test_workload_is_queued_and_fits_its_cluster_queue(
    workload: dict[str, Any], job_spec: dict[str, Any], num_pods: int
) -> None:
    labels, namespace = workload["metadata"]["labels"], workload["metadata"]["namespace"]
    assert workload["spec"]["suspend"] is True  # Kueue unsuspends it on admission
    (local,) = [
        doc
        for doc in of_kind("LocalQueue")
        if doc["metadata"]["name"] == labels["kueue.x-k8s.io/queue-name"]
        and doc["metadata"]["namespace"] == namespace
    ]
    one("WorkloadPriorityClass", labels["kueue.x-k8s.io/priority-class"])
    (group,) = one("ClusterQueue", local["spec"]["clusterQueue"])["spec"]["resourceGroups"]
    (flavor,) = group["flavors"]
    requests = trainer(job_spec)["resources"]["requests"]
    assert set(requests) <= set(group["coveredResources"])  # else Kueue never admits it
    for quota in flavor["resources"]:
        # Never admitted if it needs more than the queue's quota plus what it may borrow.
        total = num_pods * quantity(requests.get(quota["name"], 0))
        assert total <= quantity(quota["nominalQuota"]) + quantity(quota["borrowingLimit"])


def pod_failure_action(
    rules: list[dict[str, Any]], *, container: str, exit_code: int, conditions: tuple[str, ...] = ()
) -> str:
    """What the Job controller does with a failed pod: the first matching rule, else Count."""
    for rule in rules:
        on_exit = rule.get("onExitCodes")
        if (
            on_exit
            and on_exit.get("containerName", container) == container
            and (exit_code in on_exit["values"]) == (on_exit["operator"] == "In")
        ):
            return rule["action"]
        for condition in rule.get("onPodConditions", []):
            if condition["type"] in conditions and condition.get("status", "True") == "True":
                return rule["action"]
    return "Count"


@pytest.mark.parametrize(("workload", "job_spec", "num_pods"), WORKLOADS, ids=WORKLOAD_IDS)
def test_pod_failure_policy_follows_the_exit_code_contract(
    workload: dict[str, Any], job_spec: dict[str, Any], num_pods: int
) -> None:
    rules, container = job_spec["podFailurePolicy"]["rules"], trainer(job_spec)["name"]

    def action(**failure: Any) -> str:
        return pod_failure_action(rules, container=container, **failure)

    assert job_spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert action(exit_code=EXIT_REQUEUE) == "Ignore"  # preempted, checkpoint saved
    assert action(exit_code=137, conditions=("DisruptionTarget",)) == "Ignore"  # drain, eviction
    assert action(exit_code=EXIT_USAGE) == "FailJob"
    assert action(exit_code=EXIT_DIVERGED) == "FailJob"
    for counted in (1, 76, 137):  # crash, hang past torchrun's restarts, killed
        assert action(exit_code=counted) == "Count"
    if workload["kind"] == "JobSet":
        # A Job failed by its podFailurePolicy must fail the JobSet, not restart it.
        (rule,) = workload["spec"]["failurePolicy"]["rules"]
        assert (rule["action"], rule["onJobFailureReasons"]) == ("FailJobSet", ["PodFailurePolicy"])
        assert workload["spec"]["failurePolicy"]["maxRestarts"] > 0


@pytest.mark.parametrize(("workload", "job_spec", "num_pods"), WORKLOADS, ids=WORKLOAD_IDS)
def test_grace_periods_cover_the_preemption_save(
    workload: dict[str, Any], job_spec: dict[str, Any], num_pods: int
) -> None:
    env = {item["name"]: item.get("value") for item in trainer(job_spec)["env"]}
    shutdown_timeout = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    kubelet_grace = job_spec["template"]["spec"]["terminationGracePeriodSeconds"]
    # workers save within the grace < torchrun waits for them < the kubelet waits for torchrun
    assert PREEMPT_GRACE_S < shutdown_timeout < kubelet_grace


@pytest.mark.parametrize(("workload", "job_spec", "num_pods"), WORKLOADS, ids=WORKLOAD_IDS)
def test_container_runs_torchrun_with_steadytrain_and_a_valid_config(
    workload: dict[str, Any], job_spec: dict[str, Any], num_pods: int, tmp_path: Path
) -> None:
    container, pod = trainer(job_spec), job_spec["template"]["spec"]
    options, module_args = torchrun_options(container["args"])
    assert container["command"] == ["bash", "/etc/steadytrain/launch.sh"]
    assert options["rdzv-backend"] == "c10d" and int(options["max-restarts"]) > 0
    assert int(options["nnodes"]) == num_pods
    assert int(options["nproc-per-node"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    if workload["kind"] == "JobSet":
        spec, rjob = workload["spec"], workload["spec"]["replicatedJobs"][0]["name"]
        assert spec["network"]["enableDNSHostnames"] is True
        subdomain = spec["network"].get("subdomain", workload["metadata"]["name"])
        leader = f"{workload['metadata']['name']}-{rjob}-0-0.{subdomain}"
        host, port = options["rdzv-endpoint"].rsplit(":", 1)
        assert host == leader
        assert int(port) in {p["containerPort"] for p in container["ports"]}
    # The checkpoint store's credentials come from a Secret, never from the manifest.
    assert [source["secretRef"]["name"] for source in container["envFrom"]] == ["steadytrain-s3"]
    assert not [item for item in container["env"] if item["name"].startswith("AWS_")]

    assert module_args[:2] == ["steadytrain", "train"]
    config_path, *cli = module_args[2:]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (config_volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert config_path == f"{mounts['config']}/train.yaml"
    config_map = one("ConfigMap", config_volume["configMap"]["name"])
    assert config_map["metadata"]["namespace"] == workload["metadata"]["namespace"]
    (tmp_path / "train.yaml").write_text(config_map["data"]["train.yaml"])
    overrides = [cli[i + 1] for i, arg in enumerate(cli) if arg == "--set"]
    assert len(overrides) * 2 == len(cli)
    config = load_config(tmp_path / "train.yaml", overrides=overrides)
    assert str(config.checkpoint.uri).startswith("s3://")
    # What `steadytrain validate --nproc N` checks: batch layout, model, data, for this world.
    preflight(config, world_size=num_pods * int(options["nproc-per-node"]), prepare_corpus=False)


def test_network_policies_admit_only_the_workloads_own_pods() -> None:
    policies = {doc["metadata"]["name"]: doc for doc in of_kind("NetworkPolicy")}
    for workload, job_spec, num_pods in WORKLOADS:
        policy = policies[workload["metadata"]["name"]]["spec"]
        pod_labels = job_spec["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert policy["policyTypes"] == ["Ingress"]
        peers = [peer for rule in policy.get("ingress", []) for peer in rule["from"]]
        if num_pods == 1:
            assert peers == []  # the rendezvous store needs only loopback
        else:  # the pods reach each other (rendezvous, NCCL) and nothing else reaches them
            assert [peer["podSelector"]["matchLabels"] for peer in peers] == [
                policy["podSelector"]["matchLabels"]
            ]


# --- Real processes: the scripts with srun, scontrol and torchrun replaced on PATH -------------


def fake_step(name: str) -> str:
    """A stand-in for srun or torchrun: records its arguments, then per $FAKE_STEP either exits
    (``exit:N``) or runs until SIGTERM and then exits (``term:N``)."""
    return f"""#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/{name}.args"
mode=${{FAKE_STEP%%:*}} code=${{FAKE_STEP#*:}}
if [[ $mode == exit ]]; then exit "$code"; fi
trap 'echo TERM > "$FAKE_DIR/{name}.signal"; exit "$code"' TERM
touch "$FAKE_DIR/step.ready"
while :; do sleep 0.02; done
"""


FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
echo "$*" >> "$FAKE_DIR/scontrol.calls"
"""


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    for name, text in scripts.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory


def run_script(command: list[str], *, tmp_path: Path, env: dict[str, str], send: str | None) -> int:
    """Run ``command``; with ``send``, deliver that signal once the fake step is running."""
    process = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True)
    try:
        if send is not None:
            deadline = time.monotonic() + 10
            while not (tmp_path / "step.ready").exists():
                assert time.monotonic() < deadline and process.poll() is None, "step never ran"
                time.sleep(0.01)
            process.send_signal(signal.Signals[send])
        return process.wait(timeout=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def fake_env(tmp_path: Path, fake: Path, step_mode: str, **extra: str) -> dict[str, str]:
    return os.environ | {
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "FAKE_STEP": step_mode,
        **extra,
    }


SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "node-[a-b]",
    "SLURM_NNODES": "2",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_CPUS_PER_TASK": "32",
    "CONFIG": "configs/run.yaml",  # what sbatch --export=ALL,CONFIG=... would set
    "RUN_DIR": "/shared/runs/run",
}


def sbatch_options(script: str) -> dict[str, str]:
    """The ``#SBATCH`` options by name, read as sbatch does: up to the first command."""
    options = {}
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            option = line.split()[1]
            options[option.split("=")[0]] = option
    return options


def test_sbatch_script_parses_and_asks_for_the_warning_signal() -> None:
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    options = sbatch_options(SBATCH.read_text())
    assert options["--signal"].startswith("--signal=B:USR1@")
    assert options["--ntasks-per-node"] == "--ntasks-per-node=1"
    assert {"--nodes", "--gpus-per-node", "--requeue", "--open-mode"} <= options.keys()
    assert options["--open-mode"] == "--open-mode=append"


@pytest.mark.parametrize(
    ("srun_mode", "send", "requeued", "exit_code"),
    [
        ("exit:75", None, True, 75),  # the workers' "requeue me" reached srun
        ("exit:0", None, False, 0),  # finished
        ("exit:2", None, False, 2),  # bad input: a rerun fails the same way
        ("exit:1", None, False, 1),  # a failure nobody asked for
        ("term:75", "SIGUSR1", True, 75),  # warning → TERM → saved and exited 75
        ("term:1", "SIGUSR1", True, 75),  # torchrun's agent exits 1 after a forwarded stop
        ("term:0", "SIGUSR1", False, 0),  # finished as the warning came
        ("term:5", "SIGUSR1", False, 5),  # diverged: a rerun diverges again
    ],
)
def test_sbatch_script_requeues_exactly_the_preempted_runs(
    tmp_path: Path, srun_mode: str, send: str | None, requeued: bool, exit_code: int
) -> None:
    fake = fake_bin(tmp_path, srun=fake_step("srun"), scontrol=FAKE_SCONTROL)
    env = fake_env(tmp_path, fake, srun_mode, **SLURM_ENV)
    assert run_script(["bash", str(SBATCH)], tmp_path=tmp_path, env=env, send=send) == exit_code
    calls = tmp_path / "scontrol.calls"
    assert (calls.read_text() if calls.exists() else "") == ("requeue 4242\n" if requeued else "")
    assert (tmp_path / "srun.signal").exists() == (send is not None)  # USR1 went on as TERM
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    torchrun = srun_args.index("torchrun")
    assert "--kill-on-bad-exit=1" in srun_args[:torchrun]
    options, module_args = torchrun_options(srun_args[torchrun:])
    assert options["nnodes"] == "2" and options["nproc-per-node"] == "8"
    assert options["rdzv-backend"] == "c10d" and options["rdzv-endpoint"] == "node-a:29500"
    assert options["rdzv-id"] == "4242" and options["max-restarts"] == "3"
    assert " ".join(module_args) == "steadytrain train configs/run.yaml --run-dir /shared/runs/run"


@pytest.mark.parametrize(
    ("torchrun_mode", "send", "exit_code"),
    [
        ("exit:2", None, 2),  # exit codes pass through
        ("term:1", "SIGTERM", 75),  # kubelet's SIGTERM: the agent's 1 becomes the 75 meant
        ("term:0", "SIGTERM", 0),
    ],
)
def test_container_entry_point_forwards_sigterm_and_reports_the_requeue(
    tmp_path: Path, torchrun_mode: str, send: str | None, exit_code: int
) -> None:
    launch = tmp_path / "launch.sh"
    launch.write_text(one("ConfigMap", "steadytrain")["data"]["launch.sh"])
    fake = fake_bin(tmp_path, torchrun=fake_step("torchrun"))
    env = fake_env(tmp_path, fake, torchrun_mode)
    command = ["bash", str(launch), "torchrun", "--max-restarts=3", "-m", "steadytrain"]
    assert run_script(command, tmp_path=tmp_path, env=env, send=send) == exit_code
    assert (tmp_path / "torchrun.args").read_text().split() == command[3:]
    assert (tmp_path / "torchrun.signal").exists() == (send is not None)
