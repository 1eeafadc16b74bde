"""The packaged trainer, run on the nodes as `python -m seiscli.train RECIPE.yaml --run-dir DIR`.

Nothing here is imported by the launcher; this package may import torch freely below this file.
"""
