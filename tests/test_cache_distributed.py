"""The teacher cache built in shards by 2 CPU processes (gloo), checked against 1-process builds bit for bit.

One `accelerate launch` of `cache_worker.py` runs every scenario (a launch costs ~10 s of start-up); the
1-process references run the same scenario functions here. Shards hold 8 examples, so each process builds several.
"""

import os
import re

import cache_worker as worker
import pytest
import torch
from conftest import accelerate_launch

NUM_PROCESSES = 2
SCENARIOS = ["dense", "per_token", "top_k", "sampled", "trainer", "resume", "other_teacher", "other_k",
             "different_datasets"]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Every scenario, run once by 2 processes: `{scenario: [rank 0's results, rank 1's]}`."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without torch.distributed/gloo: no CPU DDP possible")
    out_dir = str(tmp_path_factory.mktemp("cache_launch"))
    returncode, log = accelerate_launch(os.path.abspath(worker.__file__), [out_dir, *SCENARIOS], NUM_PROCESSES)
    started = [os.path.join(out_dir, f"started.rank{rank}.pt") for rank in range(NUM_PROCESSES)]
    if not all(os.path.exists(path) for path in started):
        pytest.skip(f"accelerate could not start {NUM_PROCESSES} CPU processes here:\n{log[-3000:]}")
    for path in started:
        # Two processes that each build alone (world size 1) would pass every comparison below trivially.
        state = torch.load(path, weights_only=True)
        assert state == {"distributed_type": "DistributedType.MULTI_CPU", "num_processes": NUM_PROCESSES}, state
    results = {}
    for scenario in SCENARIOS:
        paths = [os.path.join(out_dir, f"{scenario}.rank{rank}.pt") for rank in range(NUM_PROCESSES)]
        if not all(os.path.exists(path) for path in paths):
            pytest.fail(f"The launch (exit code {returncode}) wrote no results for '{scenario}':\n{log[-6000:]}",
                        pytrace=False)
        results[scenario] = [torch.load(path, weights_only=True) for path in paths]
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run of a scenario, computed once per module."""
    runs = {}

    def get(scenario):
        if scenario not in runs:
            runs[scenario] = worker.run_scenario(scenario, str(tmp_path_factory.mktemp(f"ref-{scenario}")))
        return runs[scenario]

    return get


def shard_of(row: int) -> int:
    return row // worker.SHARD_EXAMPLES


def rows_of(batches) -> list[int]:
    return sorted(row for batch in batches for row in batch)


def batches_in(batches, shards) -> list[tuple]:
    """The teacher batches (as sorted tuples of rows) whose rows lie in `shards`, sorted."""
    return sorted(tuple(sorted(batch)) for batch in batches if shard_of(batch[0]) in shards)


def assert_same_cache(build, expected):
    """The same Arrow file, byte for byte, hence the same values of every column."""
    assert build["error"] is None, build["error"]
    assert build["values"].keys() == expected["values"].keys()
    for name, values in build["values"].items():
        assert values.dtype == expected["values"][name].dtype
        assert torch.equal(values, expected["values"][name]), f"column '{name}' differs from the 1-process build"
    assert build["file_sha256"] == expected["file_sha256"]


def shard_starts(names: list[str]) -> list[int]:
    """The first rows of the complete shard files among `names` (`<start>-<stop>-<digest>.arrow`)."""
    return sorted(int(match.group(1)) for name in names if (match := re.fullmatch(r"(\d+)-\d+-\w+\.arrow", name)))


@pytest.mark.parametrize("kind", ["dense", "per_token", "top_k", "sampled"])
def test_two_processes_build_the_one_process_cache_bit_for_bit(launch, reference, kind):
    ranks, one_process = launch[kind], reference(kind)["build"]
    for result in ranks:
        assert_same_cache(result["build"], one_process)
    # The shards went round-robin (process r: shards r, r + 2, ...), each with the batches one process forms.
    num_shards = shard_of(max(rows_of(one_process["batches"]))) + 1
    for rank, result in enumerate(ranks):
        assert {shard_of(row) for row in rows_of(result["build"]["batches"])} == set(range(rank, num_shards, 2))
    both = [batch for result in ranks for batch in result["build"]["batches"]]
    assert batches_in(both, range(num_shards)) == batches_in(one_process["batches"], range(num_shards))
    # One complete cache folder (beside its lock); the shards are gone once merged.
    assert ranks[0]["cache_listing"] == ranks[1]["cache_listing"]
    assert [name for name in ranks[0]["cache_listing"] if not name.endswith(".lock")] == [
        name for name in reference(kind)["cache_listing"] if not name.endswith(".lock")
    ]
    assert len(ranks[0]["cache_listing"]) == 2


def test_the_trainers_own_cache_is_built_by_both_processes(launch, reference):
    """`DistillationTrainer` with a teacher and a dataset without the column takes the same path."""
    ranks, one_process = launch["trainer"], reference("dense")["build"]
    for rank, result in enumerate(ranks):
        assert {shard_of(row) for row in rows_of(result["batches"])} == {rank, rank + 2, rank + 4}
        assert torch.equal(result["values"]["teacher_logits"], one_process["values"]["teacher_logits"])


def test_an_interrupted_build_resumes_on_the_missing_shards_only(launch, reference):
    ranks, uninterrupted = launch["resume"], reference("dense")["build"]
    # Process 0 stopped in its second shard; process 1 finished its three, then stopped too.
    assert ranks[0]["interrupted"]["error"] == "KeyboardInterrupt: "
    assert ranks[1]["interrupted"]["error"].startswith("RuntimeError: Process 0 failed while caching teacher outputs")
    finished = [0, 1, 3, 5]
    assert shard_starts(ranks[0]["shards_left"]) == [shard * worker.SHARD_EXAMPLES for shard in finished]
    assert len(ranks[0]["shards_left"]) == len(finished)  # nothing half-written among them

    # The rerun ran the teacher on the rows of shards 2 and 4 only, once, in the batches of an uninterrupted build.
    resumed = [batch for result in ranks for batch in result["resumed"]["batches"]]
    assert {shard_of(row) for row in rows_of(resumed)} == {2, 4}
    assert batches_in(resumed, {2, 4}) == batches_in(uninterrupted["batches"], {2, 4})
    assert len(resumed) < len(uninterrupted["batches"])
    for result in ranks:
        assert_same_cache(result["resumed"], uninterrupted)
        assert result["shards_after"] == []  # merged, then removed with the leftover of the kill


@pytest.mark.parametrize(("scenario", "kind"), [("other_teacher", "dense"), ("other_k", "top_k")])
def test_shards_of_another_teacher_or_k_are_rebuilt(launch, reference, scenario, kind):
    ranks, full_build = launch[scenario], reference(kind)["build"]
    assert shard_starts(ranks[0]["shards_left"])  # the other build left complete shards in the same folder
    # None of them was read: the teacher ran over every row, in the batches of a full build.
    rebuilt = [batch for result in ranks for batch in result["resumed"]["batches"]]
    assert batches_in(rebuilt, range(len(rebuilt) + 1)) == batches_in(full_build["batches"], range(len(rebuilt) + 1))
    for result in ranks:
        assert_same_cache(result["resumed"], full_build)
        assert result["shards_after"] == []


def test_one_process_resumes_an_interrupted_build(reference):
    """The path of a single process: its own interrupted build (shards 0 and 1 finished) resumes from shard 2."""
    result, uninterrupted = reference("resume"), reference("dense")["build"]
    assert result["interrupted"]["error"] == "KeyboardInterrupt: "
    assert shard_starts(result["shards_left"]) == [0, worker.SHARD_EXAMPLES]
    resumed = result["resumed"]["batches"]
    assert batches_in(resumed, range(2, 6)) == batches_in(uninterrupted["batches"], range(2, 6))
    assert batches_in(resumed, {0, 1}) == []
    assert_same_cache(result["resumed"], uninterrupted)


def test_processes_with_different_datasets_are_refused_before_any_teacher_pass(launch):
    for result in launch["different_datasets"]:
        assert result["error"].startswith("The processes would cache different teacher outputs")
        assert result["cache_listing"] == []
