"""The launcher: everything that runs on a login node (CLI, render, backends, run records, sweeps, doctor).

Never imports the trainer (`seiscli.train`) nor, at import time, torch, deepspeed or zarr.
"""
