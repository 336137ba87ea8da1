"""Serve recommendations over HTTP from an artifact folder: the same as `mmrec serve`
(multimodal_rec/commands/serve.py).

    python serve.py artifacts=artifacts/synthetic port=8000      # then open http://127.0.0.1:8000/docs
    MMREC_WRITE_TOKEN=$(cat token) python serve.py ...           # enables the writes (items, events, /admin/*)
"""

from multimodal_rec.commands.serve import main

if __name__ == "__main__":
    main()
