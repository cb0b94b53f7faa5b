"""serve's node layout from torchrun's, LeaderWorkerSet's and Slurm's variables; explicit flags win."""

from __future__ import annotations

import argparse

import pytest

from r1deploy.distributed.launcher_env import DEFAULTS, detect, first_host, resolve
from r1deploy.errors import UsageError
from r1deploy.server import cli as serve_cli

NO_FLAGS = dict.fromkeys(DEFAULTS)
TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none"}
LWS = {"LWS_LEADER_ADDRESS": "r1-0.r1.default", "LWS_WORKER_INDEX": "2", "LWS_GROUP_SIZE": "4"}
SLURM = {"SLURM_NNODES": "3", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "3",
         "SLURM_JOB_NODELIST": "gpu[07-09]"}


def test_no_launcher_gives_serves_defaults() -> None:
    assert resolve(NO_FLAGS, {}) == (DEFAULTS, [])


def test_torchrun_one_serve_per_node_meets_beside_the_agents_store() -> None:
    values, notes = resolve(NO_FLAGS, TORCHRUN)
    assert values == {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29401}
    assert notes == ["torchrun launch: --nnodes 2 ($WORLD_SIZE), --node-rank 1 ($RANK), --master-addr 10.0.0.1 "
                     "($MASTER_ADDR), --master-port 29401 ($MASTER_PORT + 1)"]


def test_plain_torch_variables_keep_master_port() -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}
    assert resolve(NO_FLAGS, env)[0]["master_port"] == 29400


@pytest.mark.parametrize("env", [{"LOCAL_RANK": "3"}, {"LOCAL_WORLD_SIZE": "8"}])
def test_torchrun_with_a_process_per_gpu_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="--nproc-per-node 1"):
        detect({**TORCHRUN, **env})


def test_leader_worker_set() -> None:
    values, _ = resolve({**NO_FLAGS, "master_port": 29500}, LWS)
    assert values == {"nnodes": 4, "node_rank": 2, "master_addr": "r1-0.r1.default", "master_port": 29500}


def test_leader_worker_set_of_one_pod_stays_on_loopback() -> None:
    values, _ = resolve(NO_FLAGS, {**LWS, "LWS_GROUP_SIZE": "1", "LWS_WORKER_INDEX": "0"})
    assert values == DEFAULTS


def test_slurm_step_takes_the_first_host_of_the_node_list() -> None:
    values, _ = resolve(NO_FLAGS, SLURM)
    assert values == {"nnodes": 3, "node_rank": 1, "master_addr": "gpu07", "master_port": 0}
    values, _ = resolve(NO_FLAGS, {**SLURM, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "29500"})
    assert (values["master_addr"], values["master_port"]) == ("10.1.1.1", 29500)


def test_slurm_batch_shell_and_several_tasks_per_node() -> None:
    assert detect({k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}) is None  # the batch script itself
    with pytest.raises(UsageError, match="--ntasks-per-node=1"):
        detect({**SLURM, "SLURM_NTASKS": "24"})


def test_torchrun_wins_over_the_slurm_job_it_runs_in() -> None:
    assert detect({**SLURM, **TORCHRUN}).launcher == "torchrun"


@pytest.mark.parametrize(("nodelist", "first"), [
    ("gpu[07-09,12]", "gpu07"), ("a1,a2", "a1"), ("node001", "node001"), ("rack[3-4]-gpu,x", "rack3-gpu"),
    ("n[1,3]", "n1")])
def test_first_host(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_flags_win_and_each_conflict_is_reported() -> None:
    flags = {**NO_FLAGS, "node_rank": 0, "master_addr": "192.168.0.9"}
    values, notes = resolve(flags, LWS)
    assert values == {"nnodes": 4, "node_rank": 0, "master_addr": "192.168.0.9", "master_port": 0}
    assert "--node-rank 0 given: it wins over LeaderWorkerSet's $LWS_WORKER_INDEX (2)" in notes
    assert "--master-addr 192.168.0.9 given: it wins over LeaderWorkerSet's $LWS_LEADER_ADDRESS (r1-0.r1.default)" \
        in notes
    assert notes[-1] == "LeaderWorkerSet launch: --nnodes 4 ($LWS_GROUP_SIZE)"


def test_a_flag_equal_to_the_launchers_value_is_no_conflict() -> None:
    _, notes = resolve({**NO_FLAGS, "nnodes": 4}, LWS)
    assert not any("wins" in n for n in notes)


def test_bad_integer_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"\$LWS_WORKER_INDEX='two'"):
        detect({**LWS, "LWS_WORKER_INDEX": "two"})


def test_serve_flags_default_to_not_given() -> None:
    """serve's parser leaves the four layout flags None unless given, so resolve() can tell a flag from a default."""
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert {k: getattr(args, k) for k in DEFAULTS} == NO_FLAGS
    args = parser.parse_args(["serve", "--node-rank", "1", "--master-port", "29500"])
    assert (args.node_rank, args.master_port, args.numa_bind) == (1, 29500, "auto")
