"""``python -m steadytrain`` (how ``--nproc`` starts its workers)."""

from steadytrain.cli import main

if __name__ == "__main__":
    main()
