"""The quality table (kept for the commands in the docs): `python -m multimodal_rec.evaluate` (`mmrec evaluate`)
with the same arguments; see its --help."""

from multimodal_rec.evaluate import main

if __name__ == "__main__":
    main()
