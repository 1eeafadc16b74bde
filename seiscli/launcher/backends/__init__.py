"""Backends: where a rendered job runs. Imported lazily by the CLI; none imports torch."""

from __future__ import annotations

from seiscli.launcher.backends.base import Backend


def get_backend(name: str) -> Backend:
    if name == "local":
        from seiscli.launcher.backends.local import LocalBackend

        return LocalBackend()
    if name in ("slurm", "hyperpod-slurm"):
        from seiscli.launcher.backends.slurm import SlurmBackend

        return SlurmBackend()
    if name == "hyperpod-eks":
        from seiscli.launcher.backends.hyperpod_eks import HyperPodEksBackend

        return HyperPodEksBackend()
    raise ValueError(f"backend {name!r} cannot submit from here; backends: local, slurm, hyperpod-slurm, hyperpod-eks")
