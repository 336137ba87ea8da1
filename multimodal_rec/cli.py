"""`mmrec <command> [arguments]`: one way in to every step of the pipeline.

    mmrec prepare data=ml100k_mm out=data/ml100k_mm      # raw files -> the canonical dataset
    mmrec train experiment=ml100k_mm                      # fit, test the best epoch -> metrics.json
    mmrec evaluate --models popularity item_knn sasrec    # baselines and the model on the one protocol
    mmrec export ckpt_path=<run> out=artifacts/ml100k_mm  # item and user vectors + what serving needs
    mmrec index embeddings=artifacts/ml100k_mm index=hnsw # a FAISS index, its recall measured
    mmrec serve artifacts=artifacts/ml100k_mm             # the ranking endpoint
    mmrec forget ...                                      # remove a person from the data

Each command is the module's own entry point (Hydra-composed from conf/, or argparse for evaluate) with its
arguments unchanged; `mmrec <command> --help` shows them.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": "multimodal_rec.data.prepare",
    "train": "multimodal_rec.commands.train",
    "evaluate": "multimodal_rec.evaluate",
    "export": "multimodal_rec.export",
    "index": "multimodal_rec.index",
    "serve": "multimodal_rec.commands.serve",
    "forget": "multimodal_rec.data.forget",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        print(f"mmrec: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name])
    # the module's own file as the program: Hydra reads the arguments after it, and a DDP launcher that
    # starts more processes with sys.argv runs that file again with them
    sys.argv = [module.__file__, *argv[1:]]
    module.main()


if __name__ == "__main__":
    main()
