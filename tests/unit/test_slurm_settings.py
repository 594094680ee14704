"""What the Slurm backend hands sbatch, from a beamtime's metadata and the command line."""

from __future__ import annotations

import pytest

from services.ops.slurm import SlurmSettings


def test_the_beamtime_metadata_gives_partition_reservation_account_and_nodes() -> None:
    section = {"slurmPartition": "upex", "slurmReservation": "p06_11019999", "userAccount": "p06user",
               "reservedNodes": ["max-p06a001", "max-p06a002"], "sshPrivateKeyPath": "ignored"}
    settings = SlurmSettings.from_online_analysis(section, time_limit="8:00:00", cpus_per_task=4, mem_mb=16000)
    assert settings.sbatch_options() == [
        "--cpus-per-task=4", "--partition=upex", "--reservation=p06_11019999", "--account=p06user",
        "--time=8:00:00", "--mem=16000M", "--nodelist=max-p06a001,max-p06a002"]
    assert SlurmSettings.from_online_analysis({}).sbatch_options() == ["--cpus-per-task=1"]


@pytest.mark.parametrize("field, value, why", [
    ("partition", "upex;rm -rf /", "letters, digits"),
    ("time_limit", "soon", "time limit"),
    ("cpus_per_task", 0, "CPUs per task"),
    ("nodelist", ("a b",), "node names"),
])
def test_what_sbatch_would_take_otherwise_is_refused_with_the_field(field, value, why) -> None:
    with pytest.raises(ValueError, match=why):
        SlurmSettings(**{field: value})
