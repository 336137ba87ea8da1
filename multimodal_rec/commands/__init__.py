"""The Hydra entry points that are not a module's own (`train`, `serve`); `mmrec` (cli.py) dispatches to them."""
